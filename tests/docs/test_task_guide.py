"""docs/tasks.md: a task of your own in one module, trained from YAML, its metrics in
metrics.jsonl (docs/examples/confidence_penalty_task.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.testing.runs import step_rows, write_tiny_config

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
TASK = ["task.type=confidence_penalty_task:ConfidencePenaltySFT", "task.beta=0.5"]


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as PYTHONPATH=docs/examples would


def _train(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    cfg, out = write_tiny_config(tmp_path, name, steps=4)
    assert main(["train", str(cfg), *TASK, *overrides]) == 0
    return step_rows(out)


def test_the_guide_task_trains_from_yaml_and_logs_its_metrics(tmp_path: Path) -> None:
    rows = _train(tmp_path, "one")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # the loss is CE - beta * entropy, each a per-token mean the task logged
        assert {"ce", "entropy"} <= r.keys()
        assert r["entropy"] > 0
        assert math.isclose(r["loss"], r["ce"] - 0.5 * r["entropy"], rel_tol=1e-5)
    # the metrics are weighted means: accumulation over microbatches gives the same values
    split = _train(tmp_path, "two", "train.microbatches=4")
    for a, b in zip(rows[:1], split[:1], strict=True):
        for key in ("loss", "ce", "entropy", "tokens"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), key


def test_a_key_the_task_does_not_take_is_one_line(tmp_path: Path, capsys) -> None:
    cfg, _ = write_tiny_config(tmp_path, "bad", steps=1)
    assert main(["train", str(cfg), *TASK, "task.betta=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "task.betta" in err and "beta" in err
