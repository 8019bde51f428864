"""configs/dpo_quickstart.yaml, kto_quickstart.yaml and reward_quickstart.yaml run as
docs/preference.md says: from the SFT quickstart's export through model.path (a tiny base and a
few steps here), logging the preference metrics on the training and held-out pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tscale.config import load_config
from tscale.train import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.synthetic.num_train=32",
    "data.synthetic.num_eval=8",
    "data.batch_size=8",
    "train.max_steps=3",
    "scheduler.warmup_steps=1",
    "train.eval_every=3",
    "train.log_every=1",
    "train.progress=false",
    "run.threads=1",
    "eval.max_new_tokens=4",
]
TASKS = {"dpo_quickstart": "dpo", "kto_quickstart": "kto", "reward_quickstart": "reward"}
ACCURACY = {"dpo": "rewards/accuracies", "kto": "rewards/accuracies", "reward": "accuracy"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_preference_config_trains_from_the_exported_base(
    tmp_path: Path, base_export: Path, name: str
) -> None:
    cfg = load_config(
        ROOT / "configs" / f"{name}.yaml",
        [*SMALL, f"model.path={base_export}", f"run.output_dir={tmp_path}"],
    )
    assert cfg.task.type == TASKS[name]
    assert cfg.data.synthetic.kind == "preference"  # all three train on the pairs
    train(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracy = ACCURACY[cfg.task.type]  # TRL's names: RewardTrainer's differ from DPO's
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if f"eval/{accuracy}" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(accuracy in r for r in steps)
    assert [r["step"] for r in evals] == [3]
    assert 0.0 <= evals[0][f"eval/{accuracy}"] <= 1.0
