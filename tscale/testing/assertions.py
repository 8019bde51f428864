"""Assertions over TensorDict trees (and TrainState records)."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.core.state import TrainState


def _as_tree(x: TensorDictBase | TrainState) -> TensorDictBase:
    return x.to_tensordict() if isinstance(x, TrainState) else x


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that NaNs compare equal and -0.0 differs from 0.0."""
    return t.reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t


def assert_trees_close(
    actual: TensorDictBase | TrainState,
    expected: TensorDictBase | TrainState,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    check_dtype: bool = True,
) -> None:
    """Assert same structure and leaf-wise closeness; the message names the worst leaf."""
    a, e = _as_tree(actual), _as_tree(expected)
    T.assert_same_structure(e, a, "expected and actual trees")
    for name, x, y in zip(T.leaf_keys(a), T.leaves(a), T.leaves(e), strict=True):
        if check_dtype and x.dtype != y.dtype:
            raise AssertionError(f"leaf {name!r}: dtype {x.dtype} != expected {y.dtype}")
        try:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, check_dtype=False)
        except AssertionError as err:
            raise AssertionError(f"leaf {name!r} differs:\n{err}") from None


def assert_trees_equal(
    actual: TensorDictBase | TrainState, expected: TensorDictBase | TrainState
) -> None:
    """Assert bitwise equality of every leaf (same structure, dtype and values; NaNs equal)."""
    a, e = _as_tree(actual), _as_tree(expected)
    T.assert_same_structure(e, a, "expected and actual trees")
    for name, x, y in zip(T.leaf_keys(a), T.leaves(a), T.leaves(e), strict=True):
        if x.dtype != y.dtype:
            raise AssertionError(f"leaf {name!r}: dtype {x.dtype} != expected {y.dtype}")
        if not torch.equal(_bits(x), _bits(y)):
            diff = (x.double() - y.double()).abs().max().item()
            raise AssertionError(f"leaf {name!r} is not bitwise equal (max abs diff {diff:.3e})")


def assert_no_alias(a: TensorDictBase | TrainState, b: TensorDictBase | TrainState) -> None:
    """Assert that no leaf of ``a`` shares storage with a leaf of ``b``."""
    ptrs = {t.untyped_storage().data_ptr() for t in T.leaves(_as_tree(b)) if t.numel()}
    for name, t in zip(T.leaf_keys(_as_tree(a)), T.leaves(_as_tree(a)), strict=True):
        if t.numel() and t.untyped_storage().data_ptr() in ptrs:
            raise AssertionError(f"leaf {name!r} aliases storage of the other tree")
