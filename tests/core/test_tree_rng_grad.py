"""Tree helpers, random keys and the gradient entry point."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.errors import ShapeError
from tscale.testing import assert_trees_close, assert_trees_equal, trees


@given(trees(max_leaves=5))
def test_flatten_unflatten_round_trip(t):
    back = T.unflatten(T.flatten(t))
    assert_trees_equal(back, t)


@given(trees(max_leaves=6))
def test_partition_combine_round_trip(t):
    t.set(("ints", "idx"), torch.arange(3))
    floats, others = T.partition(t, T.is_float)
    assert all(T.is_float(x) for x in T.leaves(floats))
    assert T.leaf_keys(others) == ["ints.idx"]
    merged = T.combine(floats, others)
    assert sorted(T.leaf_keys(merged)) == sorted(T.leaf_keys(t))
    for k in T.leaf_keys(t):
        assert torch.equal(merged.get(tuple(k.split("."))), t.get(tuple(k.split("."))))


@given(trees(max_leaves=5, dtype=torch.float64))
def test_global_norm_matches_concatenation(t):
    flat = torch.cat([x.reshape(-1) for x in T.leaves(t)])
    torch.testing.assert_close(T.global_norm(t).double(), flat.norm(), rtol=1e-5, atol=1e-6)


def test_assert_same_structure_names_the_leaf():
    a = TensorDict({"x": torch.zeros(2), "y": torch.zeros(3)}, [])
    b = TensorDict({"x": torch.zeros(2), "y": torch.zeros(4)}, [])
    with pytest.raises(ShapeError, match="'y'"):
        T.assert_same_structure(a, b)


@settings(max_examples=50)
@given(st.integers(0, 2**62), st.integers(0, 1000))
def test_rng_split_and_fold_in_are_deterministic_and_distinct(seed, data):
    k = R.key(seed)
    assert torch.equal(R.split(k, 4), R.split(R.key(seed), 4))
    ks = R.split(k, 4)
    assert len({tuple(x.tolist()) for x in ks}) == 4
    assert not torch.equal(R.fold_in(k, data), R.fold_in(k, data + 1))
    assert torch.equal(R.fold_in(k, data), R.fold_in(R.key(seed), data))


def test_rng_generator_reproducible():
    a = torch.randn(5, generator=R.generator(R.key(3)))
    b = torch.randn(5, generator=R.generator(R.key(3)))
    c = torch.randn(5, generator=R.generator(R.key(4)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _quadratic(params, x):
    y = params["w"] @ x + params["nested", "b"]
    return (y**2).sum(), {"tokens": torch.tensor(x.shape[0])}


def test_value_and_grad_matches_autograd():
    g = torch.Generator().manual_seed(0)
    params = TensorDict(
        {
            "w": torch.randn(3, 3, generator=g, dtype=torch.float64),
            "nested": {"b": torch.randn(3, generator=g, dtype=torch.float64)},
        },
        [],
    ).lock_()
    x = torch.randn(3, generator=g, dtype=torch.float64)
    (value, aux), grads = value_and_grad(_quadratic)(params, x)
    w = params["w"].clone().requires_grad_()
    b = params["nested", "b"].clone().requires_grad_()
    ref = ((w @ x + b) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(value, ref.detach())
    assert int(aux["tokens"]) == 3
    torch.testing.assert_close(grads["w"], w.grad)
    torch.testing.assert_close(grads["nested", "b"], b.grad)


def test_value_and_grad_skips_integer_leaves():
    params = TensorDict({"w": torch.ones(2), "table": torch.arange(2)}, []).lock_()

    def f(p, x):
        return (p["w"] * p["table"].float() * x).sum(), {}

    (value, _), grads = value_and_grad(f)(params, torch.ones(2))
    assert T.leaf_keys(grads) == ["w"]
    assert_trees_close(grads, TensorDict({"w": torch.tensor([0.0, 1.0])}, []))
    assert float(value) == 1.0


def test_both_gradient_engines_agree_and_vmap_composes():
    """Eager calls use torch.autograd.grad; inside vmap, torch.func. Both give the same grads,
    and value_and_grad under vmap yields per-example gradients."""
    g = torch.Generator().manual_seed(1)
    params = TensorDict(
        {
            "w": torch.randn(3, 3, generator=g, dtype=torch.float64),
            "nested": {"b": torch.randn(3, generator=g, dtype=torch.float64)},
        },
        [],
    ).lock_()
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grad_fn = value_and_grad(_quadratic)
    per_example = torch.func.vmap(lambda x: grad_fn(params, x)[1])(xs)  # torch.func engine
    for i in range(5):
        (_, _), eager = grad_fn(params, xs[i])  # autograd engine
        functorch_grads, _ = torch.func.grad_and_value(_quadratic, has_aux=True)(params, xs[i])
        assert_trees_close(per_example[i], eager, rtol=1e-12, atol=1e-12)
        assert_trees_close(functorch_grads, eager, rtol=1e-12, atol=1e-12)
