"""Combinations that were refused and now work because the wrappers compose (issue 13): the
fused loss over the LoRA stack, Sophia-G with the fused loss, a custom step with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tscale.config import load_config
from tscale.losses import make_lm_loss
from tscale.models.lora import LoraModel
from tscale.step import make_train_step
from tscale.testing.runs import TINY_RUN_YAML
from tscale.train import train

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

STEPS = 6


def _run(tmp_path: Path, name: str, *overrides: str, make_step=None) -> list[float]:
    out = tmp_path / name
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(TINY_RUN_YAML.format(out=out, steps=STEPS))
    cfg = load_config(cfg_file, ["eval.num_samples=0", NO_PLOT, *overrides])
    train(cfg, console=Console(quiet=True), make_step=make_step)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "setting",
    [
        ["lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2"],
        ["optimizer.type=sophia_g"],
    ],
    ids=["lora", "sophia_g"],
)
def test_the_fused_loss_follows_the_plain_loss(tmp_path: Path, setting: list[str]) -> None:
    plain = _run(tmp_path, "plain", *setting)
    fused = _run(tmp_path, "fused", *setting, "loss.fused=true")
    assert len(fused) == STEPS
    assert fused == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_a_custom_step_gets_the_lora_model_its_params_belong_to(tmp_path: Path) -> None:
    seen: list[object] = []

    def make_step(model, tx):
        seen.append(model)
        loss = make_lm_loss(model.apply)  # takes frozen=: the state's LoRA base
        return make_train_step(loss, tx)

    lora = ["lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2"]
    custom = _run(
        tmp_path, "custom", *lora, "loss.trained_positions_only=false", make_step=make_step
    )
    built = _run(tmp_path, "built", *lora, "loss.trained_positions_only=false")
    assert isinstance(seen[0], LoraModel)
    assert torch.tensor(custom).allclose(torch.tensor(built), rtol=1e-6, atol=1e-7)
