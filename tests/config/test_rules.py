"""The cross-field rules (tscale.config.rules): each names the keys that disagree."""

from __future__ import annotations

import pytest

from tscale.config import load_config
from tscale.config.rules import check, check_parallel, check_steps
from tscale.config.schema import resolve_defaults
from tscale.errors import ConfigError


def _cfg(*overrides: str):
    return resolve_defaults(load_config(None, list(overrides)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=6", "train.microbatches=4"], r"data\.batch_size \(6\) must be a mult"),
        (["model.hidden_size=100", "model.num_heads=3"], r"divisible by model\.num_heads"),
        (["model.num_heads=4", "model.num_kv_heads=3"], r"model\.num_kv_heads \(3\) must divide"),
        (["model.head_dim=15"], r"model\.head_dim \(15\) must be even"),
        (["model.hidden_size=12", "model.num_heads=4"], r"hidden_size / model\.num_heads \(3\)"),
        (["data.max_length=4096"], r"exceeds model\.max_position_embeddings \(2048\)"),
        (["data.synthetic.tasks=[]"], r"data\.synthetic\.tasks is empty"),
        (
            ["data.synthetic.min_items=5", "data.synthetic.max_items=4"],
            r"data\.synthetic\.max_items \(4\) must be >= data\.synthetic\.min_items \(5\)",
        ),
        (["data.synthetic.tasks=[add]", "data.synthetic.min_items=1"], r"'add' task"),
        (["data.template_date=2026-02-30"], r"data\.template_date: '2026-02-30' is not a date"),
        (["scheduler.warmup_steps=200"], r"scheduler\.warmup_steps \(200\) exceeds train\.max_s"),
        (
            ["data.streaming=true", "train.epochs=1", "train.max_steps=null"],
            r"train\.epochs: data\.streaming",
        ),
    ],
)
def test_rules_name_the_keys(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(_cfg(*overrides))


def test_valid_configs_pass_and_files_skip_the_synthetic_rules(tmp_path) -> None:
    check(_cfg())
    check(_cfg("model.hidden_size=12", "model.num_heads=4", "model.head_dim=4"))
    data = tmp_path / "t.jsonl"
    data.write_text("")
    check(_cfg(f"data.train_files=[{data}]", "data.synthetic.tasks=[]"))


def test_the_checkpoint_positions_bound_max_length(tmp_path) -> None:
    cfg = _cfg(f"model.path={tmp_path}", "data.max_length=64")
    check(cfg)  # unknown positions: nothing to compare with
    with pytest.raises(ConfigError, match=r"data\.max_length \(64\) exceeds the max_position"):
        check(cfg, checkpoint_positions=48)


def test_unresolved_configs_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="resolve"):
        check(load_config(None))


def test_steps() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps is null"):
        check_steps(load_config(None))
    check_steps(_cfg())


@pytest.mark.parametrize(
    ("overrides", "world", "sharded", "message"),
    [
        (["data.batch_size=6", "train.microbatches=2"], 2, False, "equal rank shares"),
        (["train.compile=true"], 2, False, "train.compile is not supported under torchrun"),
        (["data.max_tokens=100"], 2, False, "data.max_tokens"),
        (["optimizer.type=sophia_g", "parallel.overlap_reduce=true"], 2, False, "Hessian"),
        (["optimizer.type=prodigy"], 2, True, "not supported with sharded params"),
        (["lora.enabled=true"], 2, True, "use parallel.dp_shard: 1"),
        (["parallel.overlap_reduce=true"], 2, True, "overlap_reduce does not combine"),
        (["parallel.deepspeed.enabled=true", "parallel.dp_shard=2"], 2, False, "DeepSpeed parti"),
        (["parallel.deepspeed.enabled=true", "optimizer.type=muon"], 2, False, "whole named"),
        (
            ["parallel.deepspeed.enabled=true", "parallel.deepspeed.offload_param=cpu"],
            2,
            False,
            "offload_param needs",
        ),
    ],
)
def test_parallel_rules(overrides: list[str], world: int, sharded: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_parallel(_cfg(*overrides), world, sharded=sharded)


def test_parallel_rules_pass_a_valid_plan() -> None:
    check_parallel(_cfg("data.batch_size=8", "train.microbatches=2"), 2, sharded=False)
    check_parallel(_cfg("optimizer.type=adamw_8bit"), 2, sharded=True)
