"""The training loop end to end on a tiny run: outputs, exact resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from safetensors.torch import load_file

from tscale.config import load_config
from tscale.errors import CheckpointError, ConfigError
from tscale.testing.runs import TINY_MODEL
from tscale.train import Callback, train

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

TINY = [
    *TINY_MODEL,
    "data.synthetic.num_train=200",
    "data.synthetic.num_eval=16",
    "data.synthetic.max_items=5",
    "data.batch_size=16",
    "data.max_length=32",
    "optimizer.lr=3e-3",
    "scheduler.warmup_steps=2",
    "train.max_steps=20",
    "train.log_every=1",
    "train.save_every=7",
    "train.keep_last=0",
    "train.progress=false",
    "eval.num_samples=8",
    "eval.batch_size=8",
    "eval.max_new_tokens=8",
    "eval.num_show=1",
]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"run.output_dir={run_dir}", NO_PLOT, *extra])


def _quiet() -> Console:
    return Console(quiet=True)


def _rows(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


class StopAt(Callback):
    """Stops the run once a step is reached (what an interruption looks like to the loop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info: dict) -> None:
        if info["step"] >= self.step:
            info["stop"]()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    result = train(_cfg(run_dir), console=_quiet())
    assert result.final_step == 20
    return run_dir


def test_run_writes_metrics_config_and_checkpoints(uninterrupted: Path):
    rows = _rows(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["tokens"] > 0 and r["input_tokens"] >= r["tokens"] for r in rows)
    saved = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 20
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["step_00000007", "step_00000014", "step_00000020"]
    last = uninterrupted / "checkpoints" / "step_00000020"
    assert (last / "config.yaml").read_text() == (uninterrupted / "config.yaml").read_text()
    assert (last / "tokenizer.json").is_file()
    evals = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    last_eval = [e for e in evals if "eval/exact_match" in e][-1]
    assert {"eval/exact_match/reverse", "eval/exact_match/sort"} <= set(last_eval)


@pytest.mark.parametrize("resume_at", ["latest", "step_00000007"])
def test_resume_is_bitwise_identical_to_uninterrupted(
    uninterrupted: Path, tmp_path: Path, resume_at: str
):
    """Stop at step 9 (mid-epoch: 12 batches per epoch), resume, and compare every loss and the
    final params and optimizer state bit for bit. 'step_00000007' also exercises dropping the
    metrics rows logged after the checkpoint."""
    run_dir = tmp_path / "run"
    first = train(_cfg(run_dir), callbacks=[StopAt(9)], console=_quiet())
    assert first.final_step == 9
    resume = True if resume_at == "latest" else run_dir / "checkpoints" / resume_at
    cursor = json.loads(
        (
            (run_dir / "checkpoints" / ("step_00000009" if resume is True else resume_at))
            / "state.json"
        ).read_text()
    )["cursor"]
    assert cursor["epoch"] == 0 and 0 < cursor["index"] < 12  # a mid-epoch resume
    second = train(_cfg(run_dir), resume=resume, console=_quiet())
    assert second.final_step == 20
    assert _rows(run_dir) == _rows(uninterrupted)  # every step's loss, grad norm, lr: bitwise
    for name in ("params.safetensors", "opt_state.safetensors"):
        a = load_file(run_dir / "checkpoints" / "step_00000020" / name)
        b = load_file(uninterrupted / "checkpoints" / "step_00000020" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), f"{name}:{k} differs after resume"


def test_fresh_run_refuses_to_overwrite_checkpoints(uninterrupted: Path):
    with pytest.raises(CheckpointError, match="--resume"):
        train(_cfg(uninterrupted), console=_quiet())


def test_overwrite_starts_again(tmp_path: Path):
    run_dir = tmp_path / "again"
    train(_cfg(run_dir, "train.max_steps=3", "scheduler.warmup_steps=1"), console=_quiet())
    train(
        _cfg(run_dir, "train.max_steps=2", "scheduler.warmup_steps=1"),
        overwrite=True,
        console=_quiet(),
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    with pytest.raises(CheckpointError, match="exclude"):
        train(_cfg(run_dir), resume=True, overwrite=True, console=_quiet())
    # a mistake found while building the new run leaves the old checkpoints as they were
    with pytest.raises(ConfigError, match=r"data\.train_files\[0\]: .*missing\.jsonl not found"):
        train(_cfg(run_dir, f"data.train_files=[{tmp_path / 'missing.jsonl'}]"), overwrite=True)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]


def test_resume_without_checkpoint_is_an_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(tmp_path / "empty"), resume=True, console=_quiet())


def test_cross_field_errors_name_the_keys(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data.batch_size \(16\).*train.microbatches \(3\)"):
        train(_cfg(tmp_path, "train.microbatches=3"), console=_quiet())
    with pytest.raises(ConfigError, match=r"scheduler\.warmup_steps"):
        train(_cfg(tmp_path, "scheduler.warmup_steps=50"), console=_quiet())


def test_microbatched_run_matches_plain_run_closely(uninterrupted: Path, tmp_path: Path):
    """Gradient accumulation in the trainer: same losses up to float32 reassociation."""
    run_dir = tmp_path / "acc"
    train(_cfg(run_dir, "train.microbatches=4", "train.save_every=0"), console=_quiet())
    a, b = _rows(run_dir), _rows(uninterrupted)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * max(1.0, abs(rb["loss"]))
