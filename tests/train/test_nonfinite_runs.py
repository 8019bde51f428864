"""Runs that go non-finite (issue 16, item 7): said on the console, stopped after
train.max_nonfinite_steps bad steps in a row with the last good checkpoint kept, never a
non-finite checkpoint, and strict JSON in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.testing.runs import write_tiny_config

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli


def _run(tmp_path: Path, name: str, steps: int, *overrides: str) -> tuple[int, Path]:
    cfg, out = write_tiny_config(tmp_path, name, steps=steps)
    return main(["train", str(cfg), "eval.num_samples=0", NO_PLOT, *overrides]), out


def _rows(out: Path) -> list[dict]:
    text = (out / "metrics.jsonl").read_text()
    # strict JSON: Python's parser would accept NaN; refuse it as a strict reader does
    return [json.loads(x, parse_constant=_refuse) for x in text.splitlines()]


def _refuse(name: str) -> None:
    raise AssertionError(f"metrics.jsonl holds {name}: not strict JSON")


def test_every_step_skipped_stops_with_one_line_and_keeps_the_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tmp_path, "good", 4, "train.save_every=4")
    assert code == 0
    capsys.readouterr()
    # the same run resumed with a learning rate that overflows: every update is skipped
    cfg, _ = write_tiny_config(tmp_path, "good", steps=30)
    code = main(
        ["train", str(cfg), "--resume", "eval.num_samples=0", "optimizer.lr=1e300",
         "train.max_nonfinite_steps=5"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "train.max_nonfinite_steps" in err[0]
    assert "step_00000004" in err[0] and "Traceback" not in captured.err
    assert "non-finite gradients or loss" in captured.out  # said while it happened
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004"]  # no save of the stopped run
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["skipped"] for r in rows[4:]] == [1, 2, 3, 4, 5]
    # a skipped step logs the lr its update would have used (the schedule at the optimizer's
    # count of applied updates, which stays at 4), never 0.0 for a skipped warm-up step
    assert {r["lr"] for r in rows[4:]} == {rows[4]["lr"]} and rows[4]["lr"] > 0


def test_nan_params_are_never_saved_and_rows_stay_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(
        tmp_path, "nan", 8,
        "optimizer.lr=1e300", "optimizer.skip_nonfinite=false", "train.max_nonfinite_steps=0",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "params hold NaN/inf" in captured.err and "not saved" in captured.err
    assert not list(out.glob("checkpoints/step_*"))  # nothing saved, not even the final step
    rows = [r for r in _rows(out) if "loss" in r and "nonfinite" in r]
    assert rows and all(r["loss"] is None and "loss" in r["nonfinite"] for r in rows)


def test_a_huge_init_is_stopped_not_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(tmp_path, "init", 20, "model.init_std=1e30", "train.max_nonfinite_steps=3")
    captured = capsys.readouterr()
    assert code == 2 and "steps 1-3: 3 steps in a row" in captured.err
    assert not list(out.glob("checkpoints/step_*"))
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
