"""Property tests of the transforms: chain laws, clipping bound, structure and dtype stability."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T
from tscale.testing import assert_trees_close, assert_trees_equal, float_dtypes, trees

SETTINGS = settings(max_examples=25, deadline=None)


def _grads(params: TensorDict, seed: int, steps: int, scale: float = 1.0) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    return [
        params.apply(
            lambda p: (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype)
        )
        for _ in range(steps)
    ]


def _updates(tx: optim.GradientTransformation, params: TensorDict, grads: list[TensorDict]):
    """The updates of each step, applied to a private copy of params."""
    params = params.clone()
    state = tx.init(params)
    out = []
    for grad in grads:
        updates, state = tx.update(grad.clone(), state, params)
        out.append(updates.clone())
        optim.apply_updates(params, updates)
    return out


def _adamw_parts() -> list[optim.GradientTransformation]:
    return [
        optim.clip_by_global_norm(1.0),
        optim.scale_by_adam(b1=0.8, b2=0.9),
        optim.add_decayed_weights(0.1, optim.default_decay_mask),
        optim.scale_by_learning_rate(optim.warmup_cosine(1e-2, 2, 6, 0.1)),
    ]


@SETTINGS
@given(params=trees(dtype=torch.float64), seed=st.integers(0, 2**16))
def test_chain_identity(params: TensorDict, seed: int) -> None:
    grads = _grads(params, seed, 3)
    expected = _updates(optim.chain(*_adamw_parts()), params, grads)
    for tx in (
        optim.chain(optim.identity(), optim.chain(*_adamw_parts())),
        optim.chain(optim.chain(*_adamw_parts()), optim.identity()),
        optim.chain(optim.identity(), *_adamw_parts(), optim.identity()),
    ):
        for a, e in zip(_updates(tx, params, grads), expected, strict=True):
            assert_trees_equal(a, e)


@SETTINGS
@given(params=trees(dtype=torch.float64), seed=st.integers(0, 2**16))
def test_chain_associativity(params: TensorDict, seed: int) -> None:
    grads = _grads(params, seed, 3)

    def build(kind: str) -> optim.GradientTransformation:
        a, b, c, d = _adamw_parts()
        if kind == "flat":
            return optim.chain(a, b, c, d)
        if kind == "left":
            return optim.chain(optim.chain(optim.chain(a, b), c), d)
        return optim.chain(a, optim.chain(b, optim.chain(c, d)))

    expected = _updates(build("flat"), params, grads)
    for kind in ("left", "right"):
        for a, e in zip(_updates(build(kind), params, grads), expected, strict=True):
            assert_trees_equal(a, e)


@SETTINGS
@given(
    grads=trees(dtype=float_dtypes(), scale=10.0),
    max_norm=st.floats(1e-3, 100.0),
)
def test_clipped_norm_never_above_max(grads: TensorDict, max_norm: float) -> None:
    tx = optim.clip_by_global_norm(max_norm)
    before = grads.clone()
    norm_before = math.sqrt(sum(float((t.double() ** 2).sum()) for t in T.leaves(before)))
    out, _ = tx.update(grads, tx.init(grads), None)
    norm_after = math.sqrt(sum(float((t.double() ** 2).sum()) for t in T.leaves(out)))
    assert norm_after <= max_norm * (1 + 1e-5)
    if norm_before <= max_norm - 1e-5:
        assert_trees_close(out, before, atol=0, rtol=0)
    else:
        assert norm_after == pytest.approx(min(norm_before, max_norm), rel=1e-5)


@SETTINGS
@given(
    params=trees(dtype=float_dtypes(include_half=True)),
    seed=st.integers(0, 2**16),
    mask=st.sampled_from([None, optim.default_decay_mask]),
    clip=st.sampled_from([None, 1.0]),
)
def test_shapes_dtypes_and_state_structure_stable(params, seed, mask, clip) -> None:
    tx = optim.adamw(optim.warmup_cosine(1e-2, 1, 4), weight_decay=0.1, mask=mask)
    if clip is not None:  # chained in front: one flat chain, the clip's state first
        tx = optim.chain(optim.clip_by_global_norm(clip), tx)
    params = params.clone()
    dtypes = [p.dtype for p in T.leaves(params)]
    state = tx.init(params)

    def signature(td: TensorDict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [
            (k, tuple(t.shape), t.dtype) for k, t in zip(T.leaf_keys(td), T.leaves(td), strict=True)
        ]

    state_sig = signature(state)
    adam_state = state["1" if clip else "0"]
    moments = zip(
        T.leaves(params), T.leaves(adam_state["mu"]), T.leaves(adam_state["nu"]), strict=True
    )
    for p, m, v in moments:
        moment = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        assert m.dtype == v.dtype == moment and m.shape == p.shape
    for step, grad in enumerate(_grads(params, seed, 4)):
        updates, state = tx.update(grad, state, params)
        assert signature(updates) == signature(grad)
        assert signature(state) == state_sig
        assert all(bool(torch.isfinite(u).all()) for u in T.leaves(updates))
        optim.apply_updates(params, updates)
        assert [p.dtype for p in T.leaves(params)] == dtypes
        assert int(adam_state["count"]) == step + 1


def test_default_decay_mask() -> None:
    m = optim.default_decay_mask
    assert m("model.layers.0.mlp.up_proj.weight", torch.zeros(4, 4))
    assert not m("model.layers.0.mlp.up_proj.bias", torch.zeros(4))
    assert not m("model.norm.weight", torch.zeros(4))
    assert not m("model.gate", torch.zeros(()))
    assert not m("model.embed_tokens.weight", torch.zeros(10, 4))


def test_add_decayed_weights_mask_callable_and_cache() -> None:
    params = T.unflatten({"a.weight": torch.ones(2, 2), "b.skip": torch.ones(3)})
    calls: list[str] = []

    def mask(name: str, t: torch.Tensor) -> bool:
        calls.append(name)
        return not name.endswith("skip")

    tx = optim.add_decayed_weights(0.5, mask)
    for _ in range(3):
        upd, _ = tx.update(params.apply(torch.zeros_like), tx.init(params), params)
        assert torch.equal(upd["a", "weight"], torch.full((2, 2), 0.5))
        assert torch.equal(upd["b", "skip"], torch.zeros(3))
    assert calls == ["a.weight", "b.skip"]  # resolved once, then cached
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params.apply(torch.zeros_like), tx.init(params), None)


def test_scale_and_schedule_transforms() -> None:
    params = T.unflatten({"w": torch.ones(3, dtype=torch.float64)})
    upd, _ = optim.scale(-2.0).update(params.clone(), optim.empty_state(), params)
    assert torch.equal(upd["w"], torch.full((3,), -2.0, dtype=torch.float64))
    tx = optim.scale_by_schedule(optim.linear_warmup(1.0, 4))
    state = tx.init(params)
    assert state["count"].dtype == torch.int64 and state["count"].ndim == 0
    seen = []
    for _ in range(6):
        upd, state = tx.update(params.clone(), state, params)
        seen.append(float(upd["w"][0]))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    upd, _ = optim.scale_by_learning_rate(0.5).update(params.clone(), optim.empty_state(), params)
    assert torch.equal(upd["w"], torch.full((3,), -0.5, dtype=torch.float64))


def test_structure_mismatch_is_an_error() -> None:
    params = T.unflatten({"a": torch.ones(2), "b": torch.ones(2)})
    tx = optim.scale_by_adam()
    state = tx.init(params)
    with pytest.raises(ValueError, match="leaves"):
        tx.update(T.unflatten({"a": torch.ones(2)}), state, params)
    with pytest.raises(ValueError, match="floating-point"):
        tx.init(T.unflatten({"a": torch.ones(2, dtype=torch.int64)}))


def test_chain_rejects_non_transforms() -> None:
    with pytest.raises(ValueError, match="chain argument 1"):
        optim.chain(optim.identity(), optim.scale_by_adam)  # type: ignore[arg-type]


def test_empty_tree() -> None:
    params = TensorDict({}, batch_size=[])
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))
    state = tx.init(params)
    updates, state = tx.update(TensorDict({}, batch_size=[]), state, params)
    assert optim.apply_updates(params, updates) is params


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: optim.scale_by_adam(b1=1.0), "b1"),
        (lambda: optim.scale_by_adam(b2=-0.1), "b2"),
        (lambda: optim.scale_by_adam(eps=-1.0), "eps"),
        (lambda: optim.scale_by_adam(b1="0.9"), "b1"),
        (lambda: optim.clip_by_global_norm(0.0), "max_norm"),
        (lambda: optim.clip_by_global_norm(float("nan")), "max_norm"),
        (lambda: optim.add_decayed_weights(-0.1), "weight_decay"),
        (lambda: optim.add_decayed_weights(0.1, mask="all"), "mask"),
        (lambda: optim.scale(float("inf")), "factor"),
        (lambda: optim.scale_by_schedule(0.1), "schedule"),
        (lambda: optim.scale_by_learning_rate(-1e-3), "learning_rate"),
        (lambda: optim.adamw(1e-3, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_factories_validate_eagerly(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
