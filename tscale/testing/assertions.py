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


def _signature(tree: TensorDictBase) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [
        (k, tuple(t.shape), t.dtype) for k, t in zip(T.leaf_keys(tree), T.leaves(tree), strict=True)
    ]


def assert_transform_contract(
    tx, params: TensorDictBase, *, steps: int = 3, seed: int = 0, check_finite: bool = False
) -> None:
    """Run ``tx`` (a ``GradientTransformation``) for ``steps`` updates on random gradients and
    assert its contract: updates have the gradients' names, shapes and dtypes; the state keeps
    the structure ``init`` gave it; ``params`` are never modified; with ``check_finite``, every
    update is finite."""
    state = tx.init(params)
    state_sig, before = _signature(state), params.clone()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grad = params.apply(lambda p: torch.randn(p.shape, generator=g).to(p.dtype))
        grad_sig = _signature(grad)
        updates, state = tx.update(grad, state, params)
        if _signature(updates) != grad_sig:
            raise AssertionError(f"step {step}: updates do not match the gradients' structure")
        if _signature(state) != state_sig:
            raise AssertionError(f"step {step}: the state changed structure")
        if check_finite and not all(bool(torch.isfinite(t).all()) for t in T.leaves(updates)):
            raise AssertionError(f"step {step}: a non-finite update")
        for name, a, b in zip(T.leaf_keys(params), T.leaves(params), T.leaves(before), strict=True):
            if not torch.equal(a, b):
                raise AssertionError(f"step {step}: update modified params leaf {name!r}")
