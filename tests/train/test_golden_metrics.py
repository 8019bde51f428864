"""The quickstart's metrics.jsonl is a fixed point of refactoring (issue 13: behaviour for SFT
does not change). The golden file was written by commit 65ee7b6 (before the tasks redesign) with
the config below on one thread; this test reruns it and compares every row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tscale.config.load import load_config
from tscale.train.trainer import train

GOLDEN = Path(__file__).parent / "golden" / "quickstart_60.jsonl"
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
OVERRIDES = [
    "train.max_steps=60",
    "scheduler.warmup_steps=10",
    "train.log_every=5",
    "train.eval_every=30",
    "train.save_every=30",
    "eval.num_samples=20",
    "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=40",
    "run.threads=1",
]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_quickstart_metrics_equal_the_golden_file(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [f"run.output_dir={tmp_path / 'run'}", *OVERRIDES])
    train(cfg)
    got, want = _rows(tmp_path / "run" / "metrics.jsonl"), _rows(GOLDEN)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]  # same rows, same keys
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, float):  # bit-equal here; 1e-6 for another CPU's rounding
                assert math.isclose(g[key], value, rel_tol=1e-6, abs_tol=1e-9), (g["step"], key)
            else:
                assert g[key] == value, (g["step"], key)
