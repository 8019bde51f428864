"""``tscale schedule plot``: a valid PNG of the learning rate, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscale.cli import main
from tscale.config import Config, TrainConfig
from tscale.optim import LinearConfig

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writes_a_png(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plots" / "lr.png"
    overrides = ["scheduler.type=wsd", "scheduler.decay_fraction=0.3", "train.max_steps=300"]
    rc = main(
        ["schedule", "plot", str(ROOT / "configs/quickstart.yaml"), *overrides, "-o", str(out)]
    )
    assert rc == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert f"wrote {out}" in capsys.readouterr().out


def test_schedule_points_follow_the_schedule() -> None:
    from tscale.train.plot import schedule_points

    cfg = Config(scheduler=LinearConfig(warmup_steps=10), train=TrainConfig(max_steps=50))
    steps, lrs = schedule_points(cfg)
    assert steps == list(range(50)) and lrs[0] == 0.0 and lrs[10] == max(lrs)
    long = Config(train=TrainConfig(max_steps=100_000))
    steps, lrs = schedule_points(long, max_points=500)
    assert len(steps) == 500 and steps[0] == 0 and steps[-1] == 99_999


def test_a_config_mistake_is_one_line(tmp_path: Path, capsys) -> None:
    cfg = str(ROOT / "configs/quickstart.yaml")
    rc = main(["schedule", "plot", cfg, "scheduler.num_cycles=3", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "x.png").exists()
    assert err.strip() == (
        "tscale: error: override 'scheduler.num_cycles=3': scheduler.num_cycles is not a field "
        "of scheduler.type: cosine (cosine_restarts takes it)"
    )
