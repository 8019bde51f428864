"""BatchLoader options: length grouping, longest-first, token budgets, rank shards, prefetch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.data import IGNORE_INDEX, BatchLoader
from tscale.errors import DataError

PAD = 0


def make_examples(n: int, seed: int = 0, max_len: int = 40) -> list[dict]:
    """Example i starts with token 1000 + i (its identity); lengths spread widely."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [1000 + i] + [rng.randint(3, 99) for _ in range(length - 1)]
        out.append({"input_ids": ids, "labels": [5] * length})
    return out


def ids_of(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 1000).tolist()


def take(loader: BatchLoader, k: int) -> list:
    return list(itertools.islice(iter(loader), k))


def padded_tokens(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


def test_group_by_length_pads_less_and_still_visits_each_example_once():
    ex = make_examples(400)
    plain = BatchLoader(ex, 8, seed=1, shuffle=True, pad_id=PAD, pad_to_multiple_of=1)
    grouped = BatchLoader(
        ex, 8, seed=1, shuffle=True, pad_id=PAD, pad_to_multiple_of=1, group_by_length=True
    )
    a, b = take(plain, 50), take(grouped, 50)
    assert padded_tokens(b) < 0.75 * padded_tokens(a)
    seen = [i for batch in b for i in ids_of(batch)]
    assert len(seen) == len(set(seen)) == 400


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 90), batch=st.integers(1, 16), group=st.booleans(), seed=st.integers(0, 99))
def test_keeping_the_last_batch_trains_every_example_each_epoch(n, batch, group, seed):
    batch = min(batch, n)
    ex = make_examples(n, seed=seed)
    kept = BatchLoader(
        ex, batch, seed=seed, shuffle=True, pad_id=PAD, group_by_length=group, drop_last=False
    )
    dropped = BatchLoader(ex, batch, seed=seed, shuffle=True, pad_id=PAD, group_by_length=group)
    per_epoch = -(-n // batch)
    assert kept.num_batches_per_epoch == per_epoch
    assert dropped.num_batches_per_epoch == n // batch
    batches = take(kept, per_epoch)
    assert all(len(ids_of(b)) == batch for b in batches)  # full batches: ranks/microbatches split
    seen = [i for b in batches for i in ids_of(b)]
    assert set(seen) == set(range(n))  # every example, the last batch's fill a second time
    assert len(seen) - n == per_epoch * batch - n


def test_longest_first_puts_the_longest_example_in_the_first_batch():
    ex = make_examples(100, seed=3)
    longest = max(range(100), key=lambda i: len(ex[i]["input_ids"]))
    loader = BatchLoader(ex, 10, seed=0, shuffle=True, pad_id=PAD, longest_first=True)
    assert longest in ids_of(next(iter(loader)))
    again = BatchLoader(ex, 10, seed=0, shuffle=True, pad_id=PAD, longest_first=True)
    again.load_state_dict({"epoch": 0, "index": 0, "seed": 0})
    assert ids_of(next(iter(again))) == ids_of(
        next(iter(BatchLoader(ex, 10, seed=0, shuffle=True, pad_id=PAD, longest_first=True)))
    )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 60), budget=st.integers(8, 200), seed=st.integers(0, 1000))
def test_token_budget_batches_respect_the_budget_and_drop_nothing(n, budget, seed):
    ex = make_examples(n, seed=seed)
    loader = BatchLoader(
        ex, n, seed=seed, shuffle=True, pad_id=PAD, max_tokens=budget, pad_to_multiple_of=4
    )
    batches = take(loader, loader.num_batches_per_epoch)
    for b in batches:
        assert b["input_ids"].numel() <= budget or b.batch_size[0] == 1
    seen = sorted(i for b in batches for i in ids_of(b))
    assert seen == list(range(n))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_make_up_the_global_batch(world_size):
    ex = make_examples(64)
    full = take(BatchLoader(ex, 8, seed=5, shuffle=True, pad_id=PAD), 12)
    shards = [
        take(
            BatchLoader(ex, 8, seed=5, shuffle=True, pad_id=PAD, rank=r, world_size=world_size), 12
        )
        for r in range(world_size)
    ]
    for step, batch in enumerate(full):
        joined = [i for r in range(world_size) for i in ids_of(shards[r][step])]
        assert joined == ids_of(batch)


def test_resume_on_another_world_size_continues_the_same_global_batches():
    ex = make_examples(64)
    two = [
        BatchLoader(ex, 8, seed=2, shuffle=True, pad_id=PAD, rank=r, world_size=2) for r in range(2)
    ]
    its = [iter(x) for x in two]
    for _ in range(11):
        for it in its:
            next(it)
    cursor = two[0].state_dict()
    assert cursor == two[1].state_dict()
    one = BatchLoader(ex, 8, seed=2, shuffle=True, pad_id=PAD)
    one.load_state_dict(cursor)
    reference = take(BatchLoader(ex, 8, seed=2, shuffle=True, pad_id=PAD), 14)[11:]
    assert [ids_of(b) for b in take(one, 3)] == [ids_of(b) for b in reference]


def test_prefetch_yields_the_same_batches_and_cursor():
    ex = make_examples(50)
    plain = BatchLoader(ex, 4, seed=0, shuffle=True, pad_id=PAD)
    pre = BatchLoader(ex, 4, seed=0, shuffle=True, pad_id=PAD, prefetch=3)
    it_a, it_b = iter(plain), iter(pre)
    for _ in range(30):
        a, b = next(it_a), next(it_b)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert plain.state_dict() == pre.state_dict()
    pre.load_state_dict({"epoch": 0, "index": 2, "seed": 0})  # moves the live iterator
    plain.load_state_dict({"epoch": 0, "index": 2, "seed": 0})
    assert torch.equal(next(it_a)["input_ids"], next(it_b)["input_ids"])


def test_packed_fields_are_padded_with_zero():
    ex = [
        {
            "input_ids": [1, 2, 3],
            "labels": [2, 3, IGNORE_INDEX],
            "position_ids": [0, 1, 0],
            "doc_ids": [1, 1, 2],
        },
        {"input_ids": [4], "labels": [IGNORE_INDEX], "position_ids": [0], "doc_ids": [1]},
    ]
    b = next(iter(BatchLoader(ex, 2, seed=0, shuffle=False, pad_id=9, pad_to_multiple_of=4)))
    assert b["input_ids"][1].tolist() == [4, 9, 9, 9]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 4
    assert b["position_ids"][0].tolist() == [0, 1, 0, 0]
    assert b["doc_ids"][1].tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 3}, "not divisible by world_size"),
        ({"rank": 2, "world_size": 2}, "rank 2"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 64, "world_size": 2}, "world_size > 1"),
        ({"prefetch": -1}, "prefetch"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(DataError, match=match):
        BatchLoader(make_examples(8), 4, seed=0, shuffle=True, pad_id=PAD, **kwargs)
