"""``--smoke`` for the benchmark scripts: their real code path at tiny sizes, in seconds on a CPU.

``tests/benchmarks/test_benchmark_smoke.py`` runs every script this way, so that a dependency
release that breaks one fails the test suite. A smoke run measures nothing: its JSON carries
``"smoke": true`` and must go to ``--out`` (never over the recorded ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SMOKE_HELP = "tiny sizes, seconds on a CPU: checks that the script runs, measures nothing"

SMOKE_TRAIN_OVERRIDES = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=4",
    "data.batch_size=8",
    "eval.num_samples=4",
    "eval.max_new_tokens=4",
    "scheduler.warmup_steps=1",
    "train.log_every=1",
]
"""The overrides a smoke run of a script that trains the quickstart adds: a smaller task."""


def add_smoke_flag(ap: argparse.ArgumentParser) -> None:
    """Add ``--smoke`` to a script's parser."""
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def parse_args(
    ap: argparse.ArgumentParser, smoke: dict[str, Any], results: Path | None
) -> argparse.Namespace:
    """Parse the command line; under ``--smoke`` the ``smoke`` values replace the defaults
    (arguments given explicitly still win) and ``--out`` must name another file than
    ``results``, the recorded result."""
    args = ap.parse_args()
    if not args.smoke:
        return args
    ap.set_defaults(**smoke)
    args = ap.parse_args()
    if args.out is None or (results is not None and Path(args.out).resolve() == results.resolve()):
        ap.error(
            "--smoke needs --out FILE outside benchmarks/results/ (a smoke run measures nothing)"
        )
    return args
