"""BatchLoader: epochs are permutations, padding is right, resume is exact and does not replay."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tscale.data.loader as loader_mod
from tscale.data import IGNORE_INDEX, BatchLoader, batch_iter
from tscale.errors import DataError

PAD = 0


def make_examples(n: int, seed: int = 0, max_len: int = 13) -> list[dict]:
    """Example i starts with token 1000 + i (its identity) and has a random length."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [1000 + i] + [rng.randint(3, 99) for _ in range(length - 1)]
        labels = [rng.choice([IGNORE_INDEX, rng.randint(3, 99)]) for _ in range(length)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def identities(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 1000).tolist()


def take(it, k: int) -> list:
    return list(itertools.islice(it, k))


def assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.batch_size == y.batch_size
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    data=st.data(),
    seed=st.integers(0, 2**40),
    shuffle=st.booleans(),
)
def test_each_epoch_visits_examples_at_most_once(n, data, seed, shuffle):
    bs = data.draw(st.integers(1, n), label="batch_size")
    loader = BatchLoader(make_examples(n), bs, seed=seed, shuffle=shuffle, pad_id=PAD)
    nb = loader.num_batches_per_epoch
    assert nb == n // bs
    it = iter(loader)
    for epoch in range(3):
        seen = [i for b in take(it, nb) for i in identities(b)]
        assert len(seen) == len(set(seen)) == nb * bs  # no repeats, only the remainder dropped
        if not shuffle:
            assert seen == list(range(nb * bs))
        if n % bs == 0:
            assert sorted(seen) == list(range(n))  # every example exactly once
        assert loader.state_dict() == {"epoch": epoch + 1, "index": 0, "seed": seed}


def test_shuffled_epochs_differ_and_cover_all_examples():
    loader = BatchLoader(make_examples(64), 8, seed=3, shuffle=True, pad_id=PAD)
    it = iter(loader)
    e0 = [i for b in take(it, 8) for i in identities(b)]
    e1 = [i for b in take(it, 8) for i in identities(b)]
    assert sorted(e0) == sorted(e1) == list(range(64))
    assert e0 != e1


def test_order_depends_on_seed_only():
    ex = make_examples(30)
    a = take(iter(BatchLoader(ex, 4, seed=1, shuffle=True, pad_id=PAD)), 20)
    b = take(iter(BatchLoader(ex, 4, seed=1, shuffle=True, pad_id=PAD)), 20)
    c = take(iter(BatchLoader(ex, 4, seed=2, shuffle=True, pad_id=PAD)), 20)
    assert_batches_equal(a, b)
    assert [identities(x) for x in a] != [identities(x) for x in c]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), data=st.data(), seed=st.integers(0, 2**40), shuffle=st.booleans())
def test_resume_is_bitwise_identical(n, data, seed, shuffle):
    bs = data.draw(st.integers(1, n), label="batch_size")
    ex = make_examples(n, seed=seed % 1000)
    nb = n // bs
    k = data.draw(st.integers(0, 3 * nb), label="batches before the checkpoint")
    m = data.draw(st.integers(1, 2 * nb + 1), label="batches after")

    straight = BatchLoader(ex, bs, seed=seed, shuffle=shuffle, pad_id=PAD)
    it = iter(straight)
    take(it, k)
    state = straight.state_dict()
    expected = take(it, m)

    resumed = BatchLoader(ex, bs, seed=seed, shuffle=shuffle, pad_id=PAD)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert_batches_equal(take(iter(resumed), m), expected)


@pytest.mark.parametrize("k", [3, 5, 10, 12])  # mid-epoch, epoch boundaries, mid second epoch
def test_resume_mid_epoch_and_at_boundary(k):
    ex = make_examples(23)
    straight = BatchLoader(ex, 4, seed=9, shuffle=True, pad_id=PAD)  # 5 batches an epoch
    it = iter(straight)
    take(it, k)
    state = straight.state_dict()
    assert state == {"epoch": k // 5, "index": k % 5, "seed": 9}
    expected = take(it, 7)
    resumed = BatchLoader(ex, 4, seed=9, shuffle=True, pad_id=PAD)
    resumed.load_state_dict(state)
    assert_batches_equal(take(iter(resumed), 7), expected)


def test_load_state_dict_jumps_without_iterating(monkeypatch):
    ex = make_examples(20)
    reference = BatchLoader(ex, 4, seed=0, shuffle=True, pad_id=PAD)
    it = iter(reference)
    take(it, 5 * 7 + 2)  # to epoch 7, index 2
    expected = next(it)

    calls = []
    collate = loader_mod._collate
    monkeypatch.setattr(loader_mod, "_collate", lambda *a: calls.append(1) or collate(*a))
    resumed = BatchLoader(ex, 4, seed=0, shuffle=True, pad_id=PAD)
    resumed.load_state_dict({"epoch": 7, "index": 2, "seed": 0})
    assert_batches_equal([next(iter(resumed))], [expected])
    assert len(calls) == 1  # one batch built: nothing skipped by iterating
    resumed.load_state_dict({"epoch": 10**9, "index": 0, "seed": 0})  # far ahead, still instant
    next(iter(resumed))
    assert len(calls) == 2


def test_load_state_dict_while_iterating_moves_the_iterator():
    ex = make_examples(20)
    loader = BatchLoader(ex, 4, seed=0, shuffle=True, pad_id=PAD)
    it = iter(loader)
    first = take(it, 3)
    loader.load_state_dict({"epoch": 0, "index": 0, "seed": 0})
    assert_batches_equal(take(it, 3), first)


def test_padding_and_dtypes():
    ex = [
        {"input_ids": [5, 6, 7], "labels": [-100, 7, 8]},
        {"input_ids": list(range(10, 20)), "labels": list(range(11, 21))},
    ]
    batch = next(iter(BatchLoader(ex, 2, seed=0, shuffle=False, pad_id=PAD)))
    assert batch.batch_size == torch.Size([2])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == (2, 16)  # longest 10, rounded up to 8
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [PAD] * 13
    assert batch["labels"][0].tolist() == [-100, 7, 8] + [IGNORE_INDEX] * 13
    assert batch["input_ids"][1].tolist() == list(range(10, 20)) + [PAD] * 6
    assert batch["labels"][1].tolist() == list(range(11, 21)) + [IGNORE_INDEX] * 6

    exact = next(iter(BatchLoader(ex, 2, seed=0, shuffle=False, pad_id=7, pad_to_multiple_of=1)))
    assert exact["input_ids"].shape == (2, 10)
    assert exact["input_ids"][0, 3:].eq(7).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 25), bs=st.integers(1, 8), mult=st.integers(1, 9))
def test_padding_property(n, bs, mult):
    ex = make_examples(n, max_len=20)
    batches = list(batch_iter(ex, bs, pad_id=PAD, pad_to_multiple_of=mult))
    rows = 0
    for b in batches:
        length = b["input_ids"].shape[1]
        assert length % mult == 0
        longest = 0
        for r, i in enumerate(identities(b)):
            ids, labels = ex[i]["input_ids"], ex[i]["labels"]
            longest = max(longest, len(ids))
            assert b["input_ids"][r, : len(ids)].tolist() == ids
            assert b["labels"][r, : len(ids)].tolist() == labels
            assert b["input_ids"][r, len(ids) :].eq(PAD).all()
            assert b["labels"][r, len(ids) :].eq(IGNORE_INDEX).all()
        assert length == -(-longest // mult) * mult
        rows += b.batch_size[0]
    assert rows == n


def test_batch_iter_keeps_order_and_last_partial_batch():
    ex = make_examples(10)
    batches = list(batch_iter(ex, 4, pad_id=PAD))
    assert [b.batch_size[0] for b in batches] == [4, 4, 2]
    assert [i for b in batches for i in identities(b)] == list(range(10))
    assert_batches_equal(list(batch_iter(ex, 4, pad_id=PAD)), batches)  # deterministic


def test_batch_iter_checks_arguments_at_the_call():
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        batch_iter(make_examples(3), 0, pad_id=PAD)


def test_batch_size_larger_than_data():
    with pytest.raises(DataError, match="batch_size 8 is larger than the 5 examples"):
        BatchLoader(make_examples(5), 8, seed=0, shuffle=True, pad_id=PAD)


@pytest.mark.parametrize(
    ("examples", "match"),
    [
        ([{"input_ids": [1, 2], "labels": [1]}], "same non-zero length"),
        ([{"input_ids": [], "labels": []}], "same non-zero length"),
        ([{"input_ids": [1]}], "has no 'labels'"),
    ],
)
def test_bad_examples(examples, match):
    with pytest.raises(DataError, match=match):
        BatchLoader(examples, 1, seed=0, shuffle=False, pad_id=PAD)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"epoch": 0, "index": 0, "seed": 1}, "seed 1 but this loader has seed 0"),
        ({"epoch": 0, "index": 5, "seed": 0}, "out of range: that epoch has 5 batches"),
        ({"epoch": -1, "index": 0, "seed": 0}, "out of range"),
        ({"epoch": 0, "seed": 0}, "needs integer epoch, index, seed"),
    ],
)
def test_bad_state(state, match):
    loader = BatchLoader(make_examples(20), 4, seed=0, shuffle=True, pad_id=PAD)
    with pytest.raises(DataError, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == {"epoch": 0, "index": 0, "seed": 0}  # unchanged
