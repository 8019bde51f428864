"""Vectorised keys: fold_in_rows equals fold_in row by row; uniform_rows is open (0, 1)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import rng as R


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**62), data=st.lists(st.integers(-(2**40), 2**40), min_size=1))
def test_fold_in_rows_equals_fold_in(seed: int, data: list[int]) -> None:
    keys = R.split(R.key(seed), len(data))
    got = R.fold_in_rows(keys, torch.tensor(data))
    want = torch.stack([R.fold_in(k, d) for k, d in zip(keys, data, strict=True)])
    assert torch.equal(got, want)
    # a scalar is broadcast over the rows
    assert torch.equal(R.fold_in_rows(keys, 7), torch.stack([R.fold_in(k, 7) for k in keys]))


def test_uniform_rows_from_split_bits_and_open_interval() -> None:
    keys = R.split(R.key(1), 3)
    u = R.uniform_rows(keys, 5000)
    assert u.shape == (3, 5000) and u.dtype == torch.float64
    for k, row in zip(keys, u, strict=True):
        bits = R.split(k, 5000)[:, 0]
        assert torch.equal(row, (((bits >> 12) & ((1 << 52) - 1)).double() + 0.5) * 2.0**-52)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    # the largest value it can give is still below 1 in float64
    assert ((2**52 - 1) + 0.5) * 2.0**-52 < 1.0
