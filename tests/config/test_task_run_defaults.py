"""A task's own defaults of the run-dependent keys (``run_defaults``): online RL (grpo, rloo,
ppo) resolves ``data.group_by_length`` to false even when fine-tuning ``model.path``; a value the
user set wins; SFT keeps the fine-tuning default."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs
import pytest

from tscale.config import load_config
from tscale.config.reference import render_reference
from tscale.config.schema import resolve_defaults, task_run_defaults
from tscale.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = "model.path=/nowhere/base"  # resolve_defaults only reads its config.json, if any
PPO = ["task.value_model=shared"]


def _resolved(*overrides: str):
    return resolve_defaults(load_config(None, list(overrides)))


@pytest.mark.parametrize("task", ["grpo", "rloo", "ppo"])
def test_online_rl_resolves_random_batches_from_a_pretrained_model(task: str) -> None:
    extra = PPO if task == "ppo" else []
    cfg = _resolved(PRETRAINED, f"task.type={task}", *extra)
    assert cfg.data.group_by_length is False
    assert cfg.data.drop_last is False  # the other keys keep the fine-tuning table's values
    assert cfg.optimizer.lr == 2e-5
    kept = _resolved(PRETRAINED, f"task.type={task}", *extra, "data.group_by_length=true")
    assert kept.data.group_by_length is True


def test_sft_keeps_the_fine_tuning_default() -> None:
    assert _resolved(PRETRAINED).data.group_by_length is True
    assert _resolved().data.group_by_length is False  # random init


@pytest.mark.parametrize("name", ["grpo_quickstart", "ppo_quickstart"])
def test_quickstart_configs_resolve_random_batches(name: str) -> None:
    cfg = resolve_defaults(load_config(str(ROOT / "configs" / f"{name}.yaml"), []))
    assert cfg.model.path is not None
    assert cfg.data.group_by_length is False


def test_an_unknown_key_is_refused_in_one_line() -> None:
    @attrs.frozen
    class Odd:
        type: str = "odd"
        run_defaults: ClassVar[dict] = {"data.batch_size": 4}

    with pytest.raises(ConfigError, match=r"task.type odd: run_defaults names 'data.batch_size'"):
        task_run_defaults(Odd())


def test_the_reference_shows_each_types_own_defaults() -> None:
    text = render_reference()
    for task in ("grpo", "rloo", "ppo"):
        section = text.split(f"### `task.type: {task}`")[1].split("\n### ")[0]
        assert "`data.group_by_length: false`" in section
    sft = text.split("### `task.type: sft`")[1].split("\n### ")[0]
    assert "group_by_length" not in sft
