"""Every registered optimizer runs under the trainer from YAML, with its own step and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tscale.config import load_config
from tscale.errors import ConfigError
from tscale.optim import OPTIMIZERS
from tscale.testing.runs import TINY_DATA, TINY_MODEL
from tscale.train import train

TINY = [
    *TINY_MODEL,
    *TINY_DATA,
    "scheduler.warmup_steps=2",
    "train.max_steps=25",
    "train.log_every=5",
    "train.progress=false",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=4",
    "eval.num_show=0",
]
PER_TYPE = {
    "adamw": ["optimizer.lr=3e-3"],
    "adamw_8bit": ["optimizer.lr=3e-3", "optimizer.min_8bit_size=256"],
    "lion": ["optimizer.lr=3e-3"],
    "prodigy": ["optimizer.lr=1.0"],
    "sophia_g": ["optimizer.lr=3e-3", "optimizer.update_every=5"],
    "schedule_free_adamw": ["optimizer.lr=3e-3", "scheduler.type=constant"],
    "muon": ["optimizer.lr=0.02"],
}


def _quiet() -> Console:
    return Console(quiet=True)


def test_every_registered_optimizer_is_covered():
    assert set(PER_TYPE) == set(OPTIMIZERS)


@pytest.mark.parametrize("opt", sorted(PER_TYPE))
def test_optimizer_trains_under_the_trainer(opt: str, tmp_path: Path):
    if opt == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    cfg = load_config(
        None, [*TINY, f"run.output_dir={tmp_path}", f"optimizer.type={opt}", *PER_TYPE[opt]]
    )
    result = train(cfg, console=_quiet())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert all(r["skipped"] == 0 for r in rows if "loss" in r)
    assert "loss" in result.summary["eval"]


def test_schedule_free_refuses_a_decay_schedule(tmp_path: Path):
    cfg = load_config(
        None,
        [
            *TINY,
            f"run.output_dir={tmp_path}",
            "optimizer.type=schedule_free_adamw",
            "scheduler.type=cosine",
        ],
    )
    with pytest.raises(ConfigError, match=r"scheduler\.type: constant"):
        train(cfg, console=_quiet())


@pytest.mark.parametrize("qlora", [False, True])
def test_lora_and_qlora_from_yaml_train_adapters_only(qlora: bool, tmp_path: Path):
    if qlora:
        pytest.importorskip("bitsandbytes")
    cfg = load_config(
        None,
        [
            *TINY,
            f"run.output_dir={tmp_path}",
            "optimizer.lr=1e-2",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.dropout=0.1",
            f"lora.qlora={str(qlora).lower()}",
            "model.init_std=0.05",
            "train.save_every=10",
            "train.max_steps=20",
        ],
    )
    result = train(cfg, console=_quiet())
    names = list(result.state.params.keys(True, True))
    assert names and all("lora_" in ".".join(n) for n in names)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # A frozen random base caps what rank-4 adapters do in 20 steps: ask for 0.1 nats.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    resumed = train(cfg, resume=tmp_path / "checkpoints" / "step_00000010", console=_quiet())
    after = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in after if "loss" in r] == losses  # exact resume, dropout included
    assert resumed.final_step == 20


def test_kernel_switches_and_fused_loss_from_yaml_match_the_default_path(tmp_path: Path):
    base = [*TINY, "optimizer.lr=3e-3", "train.max_steps=8", "train.log_every=4"]
    runs = {}
    for name, extra in {
        "default": [],
        "kernels": ["model.attention_backend=torch", "model.norm_backend=auto", "loss.fused=true"],
        "checkpointed": ["model.checkpoint_layers=true"],
    }.items():
        cfg = load_config(None, [*base, f"run.output_dir={tmp_path / name}", *extra])
        train(cfg, console=_quiet())
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert runs["kernels"] == pytest.approx(runs["default"], rel=1e-4, abs=1e-5)
    assert runs["checkpointed"] == pytest.approx(runs["default"], rel=1e-5, abs=1e-6)
