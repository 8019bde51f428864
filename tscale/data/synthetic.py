"""Built-in instruction tasks: small, checkable prompt/completion problems generated from a seed.

Every problem writes its items space-separated (``"reverse: c a t"`` → ``" t a c"``) so that a
byte-level BPE keeps each item one token (``Ġc``), and the answer can be checked exactly.

Records come in three kinds (:data:`RECORD_KINDS`, ``data.synthetic.kind``), all made from the
same generated problems and all keeping ``task`` and the correct ``answer`` (for exact match):

- ``sft``: ``{"prompt", "completion", "task"}`` (the completion is the answer);
- ``preference``: ``{"prompt", "chosen", "rejected", "task", "answer"}``: chosen is the correct
  answer, rejected the answer with one corrupted item (:func:`corrupt_answer`);
- ``kto``: ``{"prompt", "completion", "label", "task", "answer"}``: unpaired, half the records
  of each task desirable (the correct answer, ``label`` true), half undesirable (the corrupted
  one, ``label`` false).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
# Consecutive rejected draws (prompts in `exclude`) before we decide the problem space is exhausted.
_MAX_REJECTS = 10_000


def _reverse(rng: random.Random, k: int) -> tuple[str, str]:
    items = rng.choices(_LETTERS, k=k)
    return "reverse: " + " ".join(items), " " + " ".join(reversed(items))


def _sort(rng: random.Random, k: int) -> tuple[str, str]:
    items = rng.choices(_DIGITS, k=k)
    return "sort: " + " ".join(items), " " + " ".join(sorted(items))


def _number(rng: random.Random, digits: int) -> int:
    """A number of exactly ``digits`` digits (no leading zero; ``0..9`` for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _add(rng: random.Random, k: int) -> tuple[str, str]:
    da = rng.randint(1, k - 1)  # k >= 2 total digits, split between the two operands
    a, b = _number(rng, da), _number(rng, k - da)
    return f"add: {a} + {b}", f" {a + b}"


_TASKS: dict[str, tuple[Callable[[random.Random, int], tuple[str, str]], int]] = {
    # name: (generator, fewest items it needs)
    "reverse": (_reverse, 1),
    "sort": (_sort, 1),
    "add": (_add, 2),
}
TASKS: tuple[str, ...] = tuple(_TASKS)
"""Names of the built-in tasks."""

RECORD_KINDS: tuple[str, ...] = ("sft", "preference", "kto")
"""The record kinds :func:`as_kind` makes (``data.synthetic.kind``)."""

# The items an answer's item may be changed into, per task.
_ALPHABETS: dict[str, str] = {"reverse": _LETTERS, "sort": _DIGITS, "add": _DIGITS}


def _check(tasks: Sequence[str], min_items: int, max_items: int) -> None:
    if not tasks:
        raise ValueError(f"no synthetic tasks given; choose from {list(TASKS)}")
    unknown = [t for t in tasks if t not in _TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; valid tasks are {list(TASKS)}")
    if max_items < min_items:
        raise ValueError(f"max_items ({max_items}) must be >= min_items ({min_items})")
    for t in tasks:
        need = _TASKS[t][1]
        if min_items < need:
            raise ValueError(f"task {t!r} needs min_items >= {need}, got {min_items}")


def _rng(seed: int, stream: str) -> random.Random:
    """An independent ``random.Random`` per (seed, stream), stable across Python versions."""
    digest = hashlib.sha256(f"tscale.synthetic:{seed}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _draw(
    rng: random.Random,
    task: str,
    min_items: int,
    max_items: int,
    exclude: Container[str],
) -> dict:
    make = _TASKS[task][0]
    for _ in range(_MAX_REJECTS):
        prompt, completion = make(rng, rng.randint(min_items, max_items))
        if prompt not in exclude:
            return {"prompt": prompt, "completion": completion, "task": task}
    raise ValueError(
        f"task {task!r} with {min_items}..{max_items} items has too few distinct problems left "
        f"({_MAX_REJECTS} draws in a row were excluded); widen min_items/max_items or ask for "
        "fewer examples"
    )


def generate(
    tasks: Sequence[str],
    n: int,
    *,
    seed: int,
    min_items: int,
    max_items: int,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """``n`` records ``{"prompt", "completion", "task"}``, tasks in equal shares, shuffled.

    Problems are drawn independently (a prompt may repeat); none has a prompt in ``exclude``.
    The result is a pure function of the arguments.

    Raises:
        ValueError: an unknown task, bad item bounds, or a problem space too small for ``exclude``.
    """
    _check(tasks, min_items, max_items)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _rng(seed, "generate")
    records = [_draw(rng, tasks[i % len(tasks)], min_items, max_items, exclude) for i in range(n)]
    rng.shuffle(records)
    return records


def make_splits(
    tasks: Sequence[str],
    num_train: int,
    num_eval: int,
    seed: int,
    min_items: int,
    max_items: int,
) -> tuple[list[dict], list[dict]]:
    """Train and eval records with no prompt in common; eval prompts are also pairwise distinct.

    Raises:
        ValueError: as :func:`generate`.
    """
    _check(tasks, min_items, max_items)
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train}, {num_eval}")
    rng = _rng(seed, "eval")
    seen: set[str] = set()
    eval_records = []
    for i in range(num_eval):
        rec = _draw(rng, tasks[i % len(tasks)], min_items, max_items, seen)
        seen.add(rec["prompt"])
        eval_records.append(rec)
    rng.shuffle(eval_records)
    train = generate(
        tasks, num_train, seed=seed, min_items=min_items, max_items=max_items, exclude=seen
    )
    return train, eval_records


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSON lines, atomically (a temporary file in the same folder, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Preference and KTO records
# --------------------------------------------------------------------------------------------


def _items(task: str, answer: str) -> list[str]:
    """The answer's items: space-separated letters/digits, or an ``add`` sum's digits."""
    return list(answer.strip()) if task == "add" else answer.split()


def _join(task: str, items: Sequence[str]) -> str:
    return " " + ("".join(items) if task == "add" else " ".join(items))


def _changed(task: str, items: list[str], rng: random.Random) -> list[str]:
    """``items`` with one item replaced by another of the task's alphabet (a sum keeps no
    leading zero)."""
    at = rng.randrange(len(items))
    banned = {items[at]} | ({"0"} if task == "add" and at == 0 and len(items) > 1 else set())
    out = list(items)
    out[at] = rng.choice([c for c in _ALPHABETS[task] if c not in banned])
    return out


def _swapped(task: str, items: list[str], rng: random.Random) -> list[str] | None:
    """``items`` with one adjacent pair of different items swapped, None when there is none
    (a sum's swap never makes a leading zero)."""
    pairs = [
        i
        for i in range(len(items) - 1)
        if items[i] != items[i + 1] and not (task == "add" and i == 0 and items[1] == "0")
    ]
    if not pairs:
        return None
    at = rng.choice(pairs)
    out = list(items)
    out[at], out[at + 1] = out[at + 1], out[at]
    return out


def corrupt_answer(task: str, answer: str, *, seed: int, prompt: str) -> str:
    """The answer with one corrupted item: an adjacent pair of different items swapped, or one
    item changed into another letter/digit (an even draw; a change when no pair differs).

    A pure function of its arguments (the draw is seeded by ``seed`` and ``prompt``), never equal
    to ``answer``, and written as the task writes answers (same item count and spacing).

    Raises:
        ValueError: an unknown task or an answer without items.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid tasks are {list(TASKS)}")
    items = _items(task, answer)
    if not items:
        raise ValueError(f"cannot corrupt the empty answer {answer!r} of task {task!r}")
    rng = _rng(seed, f"corrupt:{task}:{prompt}")
    swap = rng.random() < 0.5
    out = (_swapped(task, items, rng) if swap else None) or _changed(task, items, rng)
    return _join(task, out)


def preference_records(records: Iterable[dict], *, seed: int) -> list[dict]:
    """Pairs ``{"prompt", "chosen", "rejected", "task", "answer"}`` from SFT records: chosen is
    the correct answer, rejected :func:`corrupt_answer` of it."""
    return [
        {
            "prompt": r["prompt"],
            "chosen": r["completion"],
            "rejected": corrupt_answer(r["task"], r["completion"], seed=seed, prompt=r["prompt"]),
            "task": r["task"],
            "answer": r["completion"],
        }
        for r in records
    ]


def kto_records(records: Sequence[dict], *, seed: int) -> list[dict]:
    """Unpaired ``{"prompt", "completion", "label", "task", "answer"}`` from SFT records, in
    their order: within each task a seeded half (every other record of a shuffled order, the
    first desirable) has the correct answer and ``label`` true, the rest the corrupted answer
    and ``label`` false."""
    rng = _rng(seed, "kto")
    desirable: set[int] = set()
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [i for i, r in enumerate(records) if r["task"] == task]
        rng.shuffle(mine)
        desirable.update(mine[::2])
    out = []
    for i, r in enumerate(records):
        good = i in desirable
        completion = (
            r["completion"]
            if good
            else corrupt_answer(r["task"], r["completion"], seed=seed, prompt=r["prompt"])
        )
        out.append(
            {
                "prompt": r["prompt"],
                "completion": completion,
                "label": good,
                "task": r["task"],
                "answer": r["completion"],
            }
        )
    return out


def as_kind(records: Sequence[dict], kind: str, *, seed: int) -> list[dict]:
    """SFT records (:func:`generate`) as records of ``kind`` (one of :data:`RECORD_KINDS`).

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "sft":
        return list(records)
    if kind == "preference":
        return preference_records(records, seed=seed)
    if kind == "kto":
        return kto_records(records, seed=seed)
    raise ValueError(
        f"unknown synthetic record kind {kind!r}; valid kinds are {list(RECORD_KINDS)}"
    )
