"""lion against a per-tensor transcription of Chen et al. (2023), Algorithm 2, in float64 (the
contract, host syncs and a tiny training run: tests/optim/test_optimizer_contract.py)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T
from tscale.optim.lion import lion, scale_by_lion
from tscale.testing import max_abs_diff, random_case
from tscale.testing.optim import DECAYED
from tscale.testing.optim import NAMED_SHAPES as SHAPES

STEPS = 12
ATOL = 1e-10


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
