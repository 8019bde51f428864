"""Shared-prompt group documents against separate prompt + completion sequences: tokens and rows.

A token count, not a timing: how many positions a preference epoch costs in each layout, on a
realistic mix of pairs whose prompt is 60-70% of a sequence's tokens (``P / (P + C)`` with ``C``
the mean of the two completion lengths; equally, ``2P / (2P + C1 + C2)`` of the pair's tokens in
the separate layout). Completion lengths are log-normal (median ``--median-completion``, clipped
to 4..``--max-completion``), the prompt share uniform in [0.6, 0.7], all from ``--seed``. Pairs
whose separate document (``2P + C1 + C2``) exceeds ``--max-length`` are left out (counted), so
both layouts hold the same pairs.

Layouts (documents from :func:`tscale.data.groups.group_document`):

- **shared**: ``share_prompt=True``: ``P - 1 + (C1 + 1) + (C2 + 1)`` tokens per pair.
- **separate**: ``share_prompt=False``: ``2P + C1 + C2`` tokens per pair (a packed row holds the
  two sequences of a pair in one document; the same tokens as two documents).
- **padded pairs** (TRL's default): chosen and rejected as two rows, batches of
  ``--batch-pairs`` pairs padded to the batch's longest sequence, in a seeded shuffled order.

For each of shared and separate: the document tokens, the packed rows of ``--max-length``
(``pack_examples``, best-fit decreasing) and their positions (rows x max_length), and the
unpacked rows (one document per row) padded to each batch's longest.

Writes ``benchmarks/results/group_layout.json`` and prints one summary line.

Usage: python benchmarks/group_layout.py [--pairs 20000] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import add_smoke_flag, parse_args

import tscale
from tscale.data.groups import group_document
from tscale.data.pack import pack_examples

RESULTS = Path(__file__).resolve().parent / "results" / "group_layout.json"
SMOKE = {"pairs": 200, "max_length": 512}


def _pairs(n: int, seed: int, median: int, longest: int) -> list[tuple[int, int, int]]:
    """``(P, C1, C2)`` per pair: log-normal completions, prompt share of a sequence in [.6, .7]."""
    rng = np.random.default_rng(seed)
    comps = np.clip(np.rint(median * rng.lognormal(0.0, 0.6, (n, 2))), 4, longest).astype(int)
    share = rng.uniform(0.6, 0.7, n)
    prompts = np.maximum(np.rint(share / (1 - share) * comps.mean(axis=1)), 1).astype(int)
    return [(int(p), int(a), int(b)) for p, (a, b) in zip(prompts, comps, strict=True)]


def _padded(lengths: list[int], batch_rows: int, seed: int) -> int:
    """Positions of rows in a shuffled order, batches of ``batch_rows`` padded to their longest."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    arr = np.asarray(lengths)[order]
    return int(sum(len(c) * int(c.max()) for c in np.array_split(arr, -(-len(arr) // batch_rows))))


def _layout(docs: list[dict], max_length: int, batch_rows: int, seed: int) -> dict[str, Any]:
    lengths = [len(d["input_ids"]) for d in docs]
    packs, report = pack_examples(docs, max_length)
    return {
        "tokens": int(sum(lengths)),
        "trained_tokens": int(sum(sum(v != -100 for v in d["labels"]) for d in docs)),
        "packed_rows": len(packs),
        "packed_positions": len(packs) * max_length,
        "packed_fill": round(report.fill_rate, 4),
        "dropped_too_long": report.dropped_too_long,
        "unpacked_padded_positions": _padded(lengths, batch_rows, seed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--median-completion", type=int, default=120)
    ap.add_argument("--max-completion", type=int, default=600)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    out = args.out or RESULTS
    drawn = _pairs(args.pairs, args.seed, args.median_completion, args.max_completion)
    # Only pairs whose separate document fits a row, so that both layouts pack the same pairs.
    pairs = [(p, a, b) for p, a, b in drawn if 2 * p + a + b <= args.max_length]
    docs = {}
    for share in (True, False):
        docs[share] = [
            group_document([5] * p, [[6] * a, [7] * b], [1, 2], share_prompt=share)
            for p, a, b in pairs
        ]
    shared = _layout(docs[True], args.max_length, args.batch_pairs, args.seed)
    separate = _layout(docs[False], args.max_length, args.batch_pairs, args.seed)
    two_rows = [n for p, a, b in pairs for n in (p + a, p + b)]
    padded_pairs = _padded(two_rows, 2 * args.batch_pairs, args.seed)
    prompt_share = [p / (p + (a + b) / 2) for p, a, b in pairs]
    result = {
        "benchmark": "group_layout",
        "smoke": bool(args.smoke),
        "tscale_version": tscale.__version__,
        "python": platform.python_version(),
        "settings": {
            "pairs": args.pairs,
            "pairs_kept": len(pairs),
            "max_length": args.max_length,
            "median_completion": args.median_completion,
            "max_completion": args.max_completion,
            "batch_pairs": args.batch_pairs,
            "seed": args.seed,
        },
        "mix": {
            "mean_prompt": round(float(np.mean([p for p, _, _ in pairs])), 1),
            "mean_completion": round(float(np.mean([a + b for _, a, b in pairs]) / 2), 1),
            "prompt_share_mean": round(float(np.mean(prompt_share)), 4),
        },
        "shared": shared,
        "separate": separate,
        "padded_pairs_positions": padded_pairs,
        "saved_tokens_fraction": round(1 - shared["tokens"] / separate["tokens"], 4),
        "packed_rows_ratio": round(shared["packed_rows"] / separate["packed_rows"], 4),
        "shared_packed_vs_padded_pairs": round(shared["packed_positions"] / padded_pairs, 4),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"group_layout: prompt share {result['mix']['prompt_share_mean']:.1%}; shared saves "
        f"{result['saved_tokens_fraction']:.1%} of the tokens, packed rows x"
        f"{result['packed_rows_ratio']:.3f} of separate, x"
        f"{result['shared_packed_vs_padded_pairs']:.3f} of padded pairs' positions -> {out}"
    )


if __name__ == "__main__":
    main()
