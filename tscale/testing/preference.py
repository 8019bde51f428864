"""Preference data for tests: reverse-the-letters pairs whose rejected answer has one letter
changed, as records or JSONL files (paired, or KTO's labelled completions)."""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["LETTERS", "letter_pairs", "write_pairs"]

LETTERS = "abcdefgh"


def letter_pairs(n: int, seed: int, *, unpaired: bool = False) -> list[dict]:
    """``n`` records: ``reverse: a b c`` → chosen ``c b a``, rejected with one letter changed;
    with ``unpaired`` KTO rows instead (the right answer desirable on even rows, the wrong one
    undesirable on odd rows)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        items = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        answer = list(reversed(items))
        wrong = list(answer)
        k = rng.randrange(len(wrong))
        wrong[k] = rng.choice([c for c in LETTERS if c != wrong[k]])
        prompt = "reverse: " + " ".join(items)
        if unpaired:
            good = i % 2 == 0
            out.append(
                {"prompt": prompt, "completion": " ".join(answer if good else wrong), "label": good}
            )
        else:
            out.append({"prompt": prompt, "chosen": " ".join(answer), "rejected": " ".join(wrong)})
    return out


def write_pairs(path: Path, n: int, seed: int, *, unpaired: bool = False) -> Path:
    """:func:`letter_pairs` written to ``path`` as JSONL; returns ``path``."""
    rows = letter_pairs(n, seed, unpaired=unpaired)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
