"""schedule_free_adamw against a per-tensor transcription of Defazio et al. (2024), Algorithm 1
(with explicit x, y and z, as the authors' reference implementation), in float64 (the contract,
host syncs and a tiny training run: tests/optim/test_optimizer_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T
from tscale.optim.schedule_free import schedule_free_adamw, schedule_free_eval_params
from tscale.testing import assert_no_alias, assert_trees_equal, max_abs_diff, random_case
from tscale.testing.optim import DECAYED
from tscale.testing.optim import NAMED_SHAPES as SHAPES

STEPS = 12
ATOL = 1e-10


def _setup(seed: int) -> tuple[TensorDict, dict[str, torch.Tensor], list[TensorDict]]:
    return random_case(SHAPES, steps=STEPS, seed=seed)


def _reference(
    params,
    grads,
    lr_at,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    wd=0.0,
    warmup=0,
    r=0.0,
    power=2.0,
    decayed=frozenset(),
):
    """Algorithm 1 of the paper with the reference's averaging weights; returns (y, x)."""
    z = {k: v.clone() for k, v in params.items()}
    x = {k: v.clone() for k, v in params.items()}
    y = {k: v.clone() for k, v in params.items()}
    v = {k: torch.zeros_like(t) for k, t in params.items()}
    weight_sum, lr_max = 0.0, -1.0
    for k, grad in enumerate(grads):
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = lr_at(k) * sched * math.sqrt(1 - b2 ** (k + 1))
        lr_max = max(lr, lr_max)
        weight = (k + 1) ** r * lr_max**power
        weight_sum += weight
        ckp1 = weight / weight_sum if weight_sum else 0.0
        g = T.flatten(grad)  # the gradient taken at y
        for n in params:
            lam = wd if n in decayed else 0.0
            z[n] = z[n] - lr * lam * y[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            z[n] = z[n] - lr * g[n] / (v[n].sqrt() + eps)
            x[n] = (1 - ckp1) * x[n] + ckp1 * z[n]
            y[n] = b1 * x[n] + (1 - b1) * z[n]
    return y, x


def _run(tx: optim.GradientTransformation, params: TensorDict, grads: list[TensorDict]):
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad.clone(), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.1, "mask": None, "warmup_steps": 4},
        {"weight_decay": 0.05, "b1": 0.5, "b2": 0.99, "r": 1.0, "weight_lr_power": 0.0},
        {"warmup_steps": 20, "r": 0.5, "eps": 1e-6},
    ],
)
def test_schedule_free_matches_paper_transcription(kwargs: dict) -> None:
    params, ref, grads = _setup(0)
    tx = schedule_free_adamw(2e-2, **kwargs)
    y, state = _run(tx, params, grads)
    decayed = set(SHAPES) if kwargs.get("mask", "default") is None else DECAYED
    rk = {k: kwargs[k] for k in ("b1", "b2", "eps", "r") if k in kwargs}
    y_ref, x_ref = _reference(
        ref,
        grads,
        lambda t: 2e-2,
        wd=kwargs.get("weight_decay", 0.0),
        warmup=kwargs.get("warmup_steps", 0),
        power=kwargs.get("weight_lr_power", 2.0),
        decayed=decayed,
        **rk,
    )
    assert max_abs_diff(y, y_ref) <= ATOL  # measured: <= 1.4e-15
    x = schedule_free_eval_params(y, state, b1=kwargs.get("b1", 0.9))
    assert max_abs_diff(x, x_ref) <= ATOL  # measured: <= 1.8e-15


def test_schedule_free_with_a_schedule_matches_paper_transcription() -> None:
    params, ref, grads = _setup(1)
    sched = optim.warmup_cosine(3e-2, warmup_steps=3, total_steps=STEPS, min_lr_ratio=0.1)
    y, state = _run(schedule_free_adamw(sched, weight_decay=0.1, warmup_steps=2), params, grads)
    y_ref, x_ref = _reference(
        ref, grads, lambda t: float(sched(torch.tensor(t))), wd=0.1, warmup=2, decayed=DECAYED
    )
    assert max_abs_diff(y, y_ref) <= ATOL
    assert max_abs_diff(schedule_free_eval_params(y, state), x_ref) <= ATOL


def test_schedule_free_hand_made_first_step() -> None:
    """Step 1: c = 1, so x = z = y: y -= lr sqrt(1 - b2) (g / (sqrt(1 - b2)|g| + eps) + wd y)."""
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64)
    tx = schedule_free_adamw(0.1, b2=0.99, weight_decay=0.5, mask=None)
    params = T.unflatten({"w": y0.clone()})
    state = tx.init(params)
    u, state = tx.update(T.unflatten({"w": g.clone()}), state, params)
    lr = 0.1 * math.sqrt(0.01)
    expected = -lr * (g / (math.sqrt(0.01) * g.abs() + 1e-8) + 0.5 * y0)
    torch.testing.assert_close(u["w"], expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(state["0"]["z"]["w"], y0 + expected, rtol=0, atol=1e-15)


def test_eval_params_is_pure_and_validated() -> None:
    params, _, grads = _setup(2)
    tx = optim.chain(optim.clip_by_global_norm(1.0), schedule_free_adamw(1e-2))
    y, state = _run(tx, params, grads[:3])
    y_before, state_before = y.clone(), state.clone()
    x = schedule_free_eval_params(y, state, 0.9)
    assert_trees_equal(y, y_before)
    assert_trees_equal(state, state_before)
    assert_no_alias(x, y)
    assert T.leaf_keys(x) == T.leaf_keys(y)
    assert not torch.equal(x["lm_head"]["weight"], y["lm_head"]["weight"])
    with pytest.raises(ValueError, match="b1"):
        schedule_free_eval_params(y, state, 0.0)
    with pytest.raises(ValueError, match="schedule-free"):
        schedule_free_eval_params(y, optim.adamw(1e-3).init(y), 0.9)


def test_schedule_free_validation_names_the_argument() -> None:
    for kwargs, name in [
        ({"b1": 0.0}, "b1"),
        ({"b1": 1.0}, "b1"),
        ({"b2": 1.5}, "b2"),
        ({"eps": 0.0}, "eps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"r": -1.0}, "r"),
        ({"weight_lr_power": -2.0}, "weight_lr_power"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ]:
        args = {"learning_rate": 1e-3, **kwargs}
        with pytest.raises(ValueError, match=name):
            schedule_free_adamw(**args)
