"""The streaming loader under data parallelism: every rank keeps its rows of the one-process
batches, and the cursor is the one-process cursor (so resume works on any world size)."""

from __future__ import annotations

import pytest

from tscale.core.result import Ok
from tscale.data.stream import StreamingBatchLoader
from tscale.errors import DataError


def _open(epoch: int):
    # 23 records of lengths 1..8: packing and padding both see uneven rows
    return [(Ok({"n": (i + epoch) % 8 + 1, "i": i}), f"row {i}") for i in range(23)]


def _prepare(records, places):
    return [Ok({"input_ids": [r["i"]] * r["n"], "labels": [r["i"]] * r["n"]}) for r in records]


def _loader(packing: bool, rank: int = 0, world_size: int = 1) -> StreamingBatchLoader:
    return StreamingBatchLoader(
        _open,
        _prepare,
        batch_size=4,
        pad_id=0,
        packing=packing,
        max_length=12,
        buffer_size=3,
        chunk_rows=5,
        rank=rank,
        world_size=world_size,
    )


def _rows(batch) -> list[list[int]]:
    ids, labels = batch["input_ids"], batch["labels"]
    return [row[lab != -100].tolist() for row, lab in zip(ids, labels, strict=True)]


@pytest.mark.parametrize("packing", [False, True])
def test_rank_shares_are_the_one_process_batches(packing: bool):
    one = _loader(packing)
    ranks = [_loader(packing, r, 2) for r in range(2)]
    its = [iter(x) for x in ranks]
    for step, whole in zip(range(15), one, strict=False):  # crosses two epochs
        shares = [next(it) for it in its]
        assert _rows(shares[0]) + _rows(shares[1]) == _rows(whole), step
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_cursor_moves_between_world_sizes():
    two = _loader(True, 1, 2)
    it = iter(two)
    for _ in range(4):
        next(it)
    one = _loader(True)
    one.load_state_dict(two.state_dict())  # 2 ranks -> 1
    reference = _loader(True)
    ref_it = iter(reference)
    for _ in range(4):
        next(ref_it)
    assert _rows(next(iter(one))) == _rows(next(ref_it))


def test_uneven_share_is_an_error():
    with pytest.raises(DataError, match="equal rank shares"):
        _loader(False, 0, 3)
