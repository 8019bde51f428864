"""The pure parts of tscale.parallel and the config checks of a distributed run (no processes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tscale.config.load import load_config
from tscale.errors import ConfigError
from tscale.parallel.ddp import bucket_indices
from tscale.parallel.fsdp import _rows_per_rank
from tscale.parallel.mesh import ParallelPlan, _degrees, world_from_env
from tscale.train.distributed import _validate


@given(st.lists(st.integers(1, 1000), max_size=30), st.integers(1, 3000))
def test_buckets_keep_order_and_respect_the_size(sizes: list[int], cap: int):
    buckets = bucket_indices(sizes, cap)
    assert [i for b in buckets for i in b] == list(range(len(sizes)))
    for b in buckets:  # over the cap only as a single oversized leaf
        assert sum(sizes[i] for i in b) <= cap or len(b) == 1


@given(st.integers(0, 200), st.integers(1, 9))
def test_row_shards_are_torch_chunks(rows: int, world: int):
    chunks = [c.shape[0] for c in torch.empty(rows).chunk(world)] if rows else []
    got = _rows_per_rank(rows, world)
    assert sum(got) == rows and len(got) == world
    assert got[: len(chunks)] == chunks and not any(got[len(chunks) :])


def test_world_from_env():
    assert world_from_env({}) == (0, 1, 0)
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ConfigError, match="RANK=3 is not in"):
        world_from_env({"RANK": "3", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="torchrun environment"):
        world_from_env({"WORLD_SIZE": "2"})


def test_degrees():
    assert _degrees(-1, 1, 4) == (4, 1)
    assert _degrees(1, -1, 4) == (1, 4)
    assert _degrees(2, 2, 4) == (2, 2)
    assert _degrees(2, 2, 1) == (1, 1)  # one process runs the YAML unsharded
    with pytest.raises(ConfigError, match="must equal the number of processes"):
        _degrees(2, 3, 4)
    with pytest.raises(ConfigError, match="does not divide"):
        _degrees(-1, 3, 4)
    with pytest.raises(ConfigError, match="cannot both be -1"):
        _degrees(-1, -1, 4)
    with pytest.raises(ConfigError, match="positive int or -1"):
        _degrees(0, 1, 4)


def _cfg(**sections):
    return load_config(sections)


FSDP2 = ParallelPlan(rank=0, world_size=2, dp_replicate=1, dp_shard=2)
DDP2 = ParallelPlan(rank=0, world_size=2, dp_replicate=2, dp_shard=1)


@pytest.mark.parametrize(
    ("sections", "plan", "message"),
    [
        ({"data": {"batch_size": 6}, "train": {"microbatches": 2}}, DDP2, "equal rank shares"),
        ({"optimizer": {"type": "sophia_g"}}, FSDP2, "not supported with sharded params"),
        ({"optimizer": {"type": "muon"}}, FSDP2, "not supported with sharded params"),
        ({"parallel": {"overlap_reduce": True}}, FSDP2, "overlap_reduce does not combine"),
        (
            {"parallel": {"overlap_reduce": True}, "train": {"microbatches": 2}},
            DDP2,
            "microbatches > 1",
        ),
        ({"lora": {"enabled": True}}, FSDP2, "use parallel.dp_shard: 1"),
    ],
)
def test_invalid_combinations_name_the_keys(sections, plan, message):
    with pytest.raises(ConfigError, match=message):
        _validate(_cfg(**sections), plan)


def test_valid_plans_pass():
    _validate(_cfg(data={"batch_size": 8}, train={"microbatches": 2}), DDP2)
    _validate(_cfg(loss={"fused": True}), FSDP2)  # the fused loss over the sharded model
    _validate(_cfg(optimizer={"type": "sophia_g"}), DDP2)  # its estimate reduced like grads
    _validate(_cfg(optimizer={"type": "adamw_8bit"}), FSDP2)
