"""Preference tasks through `tscale train`: DPO's first step is ln 2, the layouts and splits
agree, every method trains from YAML, resume is exact, LoRA's base is the reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.testing.preference import write_pairs
from tscale.testing.runs import step_rows

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli


def run_pref(tmp: Path, name: str, *overrides: str, steps: int = 4) -> list[dict]:
    train = write_pairs(tmp / "train.jsonl", 64, 0)
    held = write_pairs(tmp / "eval.jsonl", 8, 1)
    out = tmp / name
    cfg = tmp / "pref.yaml"
    cfg.write_text("run: {seed: 0}\n")
    resume = [a for a in overrides if a == "--resume"]
    overrides = tuple(a for a in overrides if a != "--resume")
    args = [
        "train",
        str(cfg),
        f"run.output_dir={out}",
        "run.seed=0",
        "run.threads=1",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.max_position_embeddings=64",
        "data.tokenizer.vocab_size=300",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{held}]",
        "data.batch_size=8",
        "data.max_length=48",
        "optimizer.lr=0.003",
        "scheduler.warmup_steps=0",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.eval_every={steps}",
        "train.progress=false",
        "eval.num_samples=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=8",
        NO_PLOT,
        *overrides,
        *resume,
    ]
    assert main(args) == 0
    return step_rows(out)


def test_dpo_first_step_is_ln2_and_metrics_are_logged(tmp_path: Path) -> None:
    rows = run_pref(tmp_path, "dpo", "task.type=dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert name in rows[0]
    assert rows[0]["tokens"] == 8  # pairs, the normaliser
    assert rows[-1]["loss"] != rows[0]["loss"]
    evals = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in evals if any(k.startswith("eval/") for k in r)]
    assert held and "eval/rewards/accuracies" in held[-1]


@pytest.mark.parametrize("override", ["task.share_prompt=false", "train.microbatches=2"])
def test_layout_and_split_do_not_change_the_run(tmp_path: Path, override: str) -> None:
    base = run_pref(tmp_path, "a", "task.type=dpo")
    other = run_pref(tmp_path, "b", "task.type=dpo", override)
    for x, y in zip(base, other, strict=True):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (override, k)


@pytest.mark.parametrize(
    "task",
    [
        ["task.type=simpo"],
        ["task.type=orpo"],
        ["task.type=cpo"],
        [
            "task.type=dpo",
            "task.loss_type=[sigmoid,bco_pair,sft]",
            "task.loss_weights=[0.8,0.2,1.0]",
        ],
        ["task.type=dpo", "task.loss_type=[ipo]"],
        ["task.type=dpo", "task.reference=none"],
    ],
)
def test_every_method_trains_from_yaml(tmp_path: Path, task: list[str]) -> None:
    rows = run_pref(tmp_path, "m", *task)
    assert len(rows) == 4
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "rewards/accuracies" in rows[-1]


def test_lora_base_is_the_reference(tmp_path: Path) -> None:
    rows = run_pref(tmp_path, "lora", "task.type=dpo", "lora.enabled=true", "lora.rank=4")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_resume_is_exact(tmp_path: Path) -> None:
    whole = run_pref(tmp_path, "whole", "task.type=dpo", "train.save_every=3", steps=6)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/checkpoints/step_00000003", part / "step_00000003")
    resumed = run_pref(tmp_path, "part", "task.type=dpo", "train.save_every=3", "--resume", steps=6)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[3:]]
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in whole[3:]]
