"""Metrics with declared reductions: combining microbatches equals the whole batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import metrics as M

values = st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12)


def _aux(x: torch.Tensor, w: torch.Tensor) -> dict:
    return {
        "tokens": w.sum(),
        "mean_x": M.mean((x * w).sum(), w.sum()),
        "max_x": M.maximum(x.max()),
        "min_x": M.minimum(x.min()),
        "sum_x": x.sum(),
    }


@settings(max_examples=50, deadline=None)
@given(values, st.integers(1, 4))
def test_combined_microbatches_equal_the_whole_batch(xs: list[float], parts: int) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    w = torch.arange(1, len(xs) + 1, dtype=torch.float64)
    chunks = list(zip(x.tensor_split(parts), w.tensor_split(parts), strict=True))
    chunks = [(a, b) for a, b in chunks if a.numel()]
    merged = {k: M.as_metric(v) for k, v in _aux(*chunks[0]).items()}
    for a, b in chunks[1:]:
        merged = M.combine(merged, _aux(a, b))
    got, want = M.finalise(merged), M.finalise(_aux(x, w))
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(want["mean_x"], (x * w).sum() / w.sum())


def test_reduce_over_applies_each_metrics_own_reduction() -> None:
    aux = {"s": M.total(torch.tensor(2.0)), "m": M.mean(torch.tensor(6.0), torch.tensor(3))}
    aux |= {"hi": M.maximum(torch.tensor(5.0)), "lo": M.minimum(torch.tensor(1.0))}
    ops: list[str] = []

    def fake_world_of_two(t: torch.Tensor, op: str) -> torch.Tensor:
        ops.append(op)  # rank 1 holds the same values: sum doubles, max/min keep
        return t * 2 if op == "sum" else t

    out = M.finalise(M.reduce_over(aux, fake_world_of_two))
    assert sorted(ops) == ["max", "min", "sum", "sum"]
    assert out == {"s": 4.0, "m": 2.0, "hi": 5.0, "lo": 1.0}


def test_a_metric_that_changes_its_reduction_is_refused() -> None:
    with pytest.raises(ValueError, match="changes its reduction"):
        M.combine({"a": M.maximum(torch.tensor(1.0))}, {"a": M.minimum(torch.tensor(1.0))})
