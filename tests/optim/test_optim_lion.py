"""lion against a per-tensor transcription of Chen et al. (2023), Algorithm 2, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode

from tscale import optim
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.lion import lion, scale_by_lion
from tscale.step import make_train_step
from tscale.testing import assert_transform_contract, max_abs_diff, random_case, trees

STEPS = 12
ATOL = 1e-10
SHAPES = {
    "model.embed_tokens.weight": (11, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.0.mlp.up_proj.bias": (6,),
    "model.norm.weight": (4,),
    "model.gate": (),
    "lm_head.weight": (11, 4),
}
# default_decay_mask written out: matrices only, not the token embedding.
DECAYED = {k for k, s in SHAPES.items() if len(s) >= 2 and "embed_tokens" not in k}


def _setup(seed: int) -> tuple[TensorDict, dict[str, torch.Tensor], list[TensorDict]]:
    return random_case(SHAPES, steps=STEPS, seed=seed)


def _reference(
    params: dict[str, torch.Tensor],
    grads: list[TensorDict],
    lr_at,
    b1: float,
    b2: float,
    wd: float,
    decayed: set[str],
) -> dict[str, torch.Tensor]:
    """Algorithm 2 of the paper, one tensor at a time."""
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, grad in enumerate(grads):
        lr = lr_at(t)
        flat = T.flatten(grad)
        for k in params:
            g = flat[k]
            c = b1 * m[k] + (1 - b1) * g
            lam = wd if k in decayed else 0.0
            params[k] = params[k] - lr * (torch.sign(c) + lam * params[k])
            m[k] = b2 * m[k] + (1 - b2) * g
    return params


def _run(tx: optim.GradientTransformation, params: TensorDict, grads: list[TensorDict]):
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad.clone(), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    ("seed", "b1", "b2", "wd", "mask"),
    [(0, 0.9, 0.99, 0.0, None), (1, 0.9, 0.99, 0.3, None), (2, 0.5, 0.9, 0.1, "default")],
)
def test_lion_matches_paper_transcription(seed, b1, b2, wd, mask) -> None:
    params, ref, grads = _setup(seed)
    m = optim.default_decay_mask if mask == "default" else None
    tx = lion(1e-2, b1=b1, b2=b2, weight_decay=wd, mask=m)
    out, _ = _run(tx, params, grads)
    decayed = DECAYED if mask == "default" else set(SHAPES)
    expected = _reference(ref, grads, lambda t: 1e-2, b1, b2, wd, decayed)
    assert max_abs_diff(out, expected) <= ATOL  # measured: <= 2.2e-16 over all cases of this file


def test_lion_schedule_matches_paper_transcription() -> None:
    params, ref, grads = _setup(3)
    sched = optim.warmup_cosine(3e-2, warmup_steps=3, total_steps=STEPS, min_lr_ratio=0.1)
    out, _ = _run(lion(sched, weight_decay=0.2), params, grads)
    expected = _reference(
        ref, grads, lambda t: float(sched(torch.tensor(t))), 0.9, 0.99, 0.2, DECAYED
    )
    assert max_abs_diff(out, expected) <= ATOL


def test_lion_hand_made_first_steps() -> None:
    """Two steps worked out by hand (lr 0.1, b1 0.9, b2 0.99, wd 0.5, all leaves decay)."""
    params = T.unflatten({"w": torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)})
    g1 = T.unflatten({"w": torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)})
    g2 = T.unflatten({"w": torch.tensor([-3.0, -1.0, 1.0, -40.0], dtype=torch.float64)})
    tx = lion(0.1, weight_decay=0.5, mask=None)
    state = tx.init(params)
    u, state = tx.update(g1.clone(), state, params)
    params = optim.apply_updates(params, u)
    # c = 0.1 g1 -> sign [1, -1, 0, 1]; w -= 0.1 (sign + 0.5 w)
    expected1 = torch.tensor(
        [1 - 0.1 * 1.5, -2 - 0.1 * (-1 - 1), 0.5 - 0.1 * 0.25, -0.1], dtype=torch.float64
    )
    torch.testing.assert_close(params["w"], expected1, rtol=0, atol=1e-15)
    # m = 0.01 g1 = [.01, -.01, 0, .02]; c = 0.9 m + 0.1 g2 = [-.291, -.109, .1, -3.982]
    u, state = tx.update(g2.clone(), state, params)
    params = optim.apply_updates(params, u)
    w1 = expected1
    expected2 = w1 - 0.1 * (torch.tensor([-1.0, -1.0, 1.0, -1.0], dtype=torch.float64) + 0.5 * w1)
    torch.testing.assert_close(params["w"], expected2, rtol=0, atol=1e-15)
    # m = 0.99 m + 0.01 g2
    m = 0.99 * 0.01 * g1["w"] + 0.01 * g2["w"]
    torch.testing.assert_close(state["0"]["mu"]["w"], m, rtol=0, atol=1e-15)


def test_lion_update_magnitude_is_lr() -> None:
    params, _, grads = _setup(4)
    tx = lion(1e-3)
    u, _ = tx.update(grads[0], tx.init(params), params)
    assert all(bool((t.abs() == 1e-3).all()) for t in T.leaves(u))


def test_lion_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="b1"):
        lion(1e-3, b1=1.0)
    with pytest.raises(ValueError, match="b2"):
        lion(1e-3, b2=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        lion(1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        lion(-1.0)
    with pytest.raises(ValueError, match="mask"):
        lion(1e-3, mask="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        scale_by_lion().init(T.unflatten({"i": torch.zeros(3, dtype=torch.int64)}))


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lion_no_host_sync_and_state_dtypes(dtype: torch.dtype) -> None:
    params, _, grads = _setup(5)
    params = params.apply(lambda p: p.to(dtype))
    tx = lion(optim.warmup_cosine(1e-2, 2, 6), weight_decay=0.1, max_grad_norm=1.0)
    state = tx.init(params)
    moment = torch.float32 if dtype == torch.bfloat16 else dtype
    assert all(m.dtype == moment for m in T.leaves(state["1"]["mu"]))
    for grad in grads[:4]:
        with _NoHostSync():
            u, state = tx.update(grad.apply(lambda t: t.to(dtype)), state, params)
            params = optim.apply_updates(params, u)
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in T.leaves(params))


@settings(max_examples=15, deadline=None)
@given(
    params=trees(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
    seed=st.integers(0, 2**16),
)
def test_lion_properties(params: TensorDict, seed: int) -> None:
    """Shapes/dtypes kept, state structure stable, params untouched by update."""
    tx = lion(1e-2, weight_decay=0.1)
    assert_transform_contract(tx, params, steps=3, seed=seed, check_finite=False)


def test_lion_trains_a_tiny_transformer() -> None:
    cfg = TransformerConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = TensorDict({"input_ids": ids, "labels": labels}, batch_size=[8])
    tx = lion(3e-3, weight_decay=0.1)
    params = model.init(R.key(0))
    state = TrainState.create(params, tx.init(params), R.key(1))
    step = make_train_step(make_lm_loss(model.apply), tx)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] <= 0.7 * losses[0], losses  # measured: 3.48 -> 1.09 (-69%)
