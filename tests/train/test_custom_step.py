"""A user's ``make_step`` through the trainer: what it gets, and what is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tscale.config.load import load_config
from tscale.errors import ConfigError
from tscale.losses import make_lm_loss
from tscale.step import make_train_step
from tscale.train import train


def _plain_step(model, tx):
    return make_train_step(make_lm_loss(model.apply), tx)


def test_microbatches_with_a_custom_step_is_refused_with_what_to_do(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "train.microbatches=2"])
    with pytest.raises(ConfigError, match=r"train.microbatches \(2\).*make_train_step") as e:
        train(cfg, console=Console(quiet=True), make_step=_plain_step)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran
