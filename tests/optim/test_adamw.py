"""adamw against torch.optim.AdamW (and clip_grad_norm_) in float64, 20 steps, max diff <= 1e-10."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T
from tscale.testing.optim import NAMED_SHAPES as SHAPES

STEPS = 20
ATOL = 1e-10


def _setup(seed: int = 0) -> tuple[TensorDict, list[torch.nn.Parameter], list[TensorDict]]:
    g = torch.Generator().manual_seed(seed)
    flat = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    params = T.unflatten(flat)
    ref = [torch.nn.Parameter(flat[k].clone()) for k in T.leaf_keys(params)]
    grads = [
        params.apply(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype) * 3.0)
        for _ in range(STEPS)
    ]
    return params, ref, grads


def _run_ours(tx, params: TensorDict, grads: list[TensorDict]) -> TensorDict:
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad.clone(), state, params)
        params = optim.apply_updates(params, updates)
    return params


def _max_diff(params: TensorDict, ref: list[torch.nn.Parameter]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(T.leaves(params), ref, strict=True))


def _set_grads(ref: list[torch.nn.Parameter], grad: TensorDict) -> None:
    for p, g in zip(ref, T.leaves(grad), strict=True):
        p.grad = g.clone()


def test_adamw_decay_all_matches_torch() -> None:
    params, ref, grads = _setup()
    tx = optim.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-8, weight_decay=0.1, mask=None)
    topt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for grad in grads:
        _set_grads(ref, grad)
        topt.step()
    out = _run_ours(tx, params, grads)
    assert _max_diff(out, ref) <= ATOL


def test_adamw_no_decay_matches_torch() -> None:
    params, ref, grads = _setup(1)
    tx = optim.adamw(3e-3)
    topt = torch.optim.AdamW(ref, lr=3e-3, weight_decay=0.0)
    for grad in grads:
        _set_grads(ref, grad)
        topt.step()
    assert _max_diff(_run_ours(tx, params, grads), ref) <= ATOL


def _grouped_adamw(params: TensorDict, ref: list[torch.nn.Parameter], lr: float, wd: float):
    names = T.leaf_keys(params)
    decay = [p for n, p in zip(names, ref, strict=True) if optim.default_decay_mask(n, p)]
    no_decay = [p for n, p in zip(names, ref, strict=True) if not optim.default_decay_mask(n, p)]
    # The mask must split the test params both ways, or the test proves nothing.
    assert decay and no_decay
    assert not optim.default_decay_mask("model.embed_tokens.weight", torch.zeros(3, 3))
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def test_adamw_default_mask_matches_torch_param_groups() -> None:
    params, ref, grads = _setup(2)
    tx = optim.adamw(1e-2, weight_decay=0.1)  # mask=default_decay_mask
    topt = _grouped_adamw(params, ref, 1e-2, 0.1)
    for grad in grads:
        _set_grads(ref, grad)
        topt.step()
    assert _max_diff(_run_ours(tx, params, grads), ref) <= ATOL


def test_adamw_warmup_cosine_schedule_matches_torch() -> None:
    params, ref, grads = _setup(3)
    sched = optim.warmup_cosine(2e-2, warmup_steps=5, total_steps=STEPS, min_lr_ratio=0.1)
    tx = optim.adamw(sched, weight_decay=0.05)
    topt = _grouped_adamw(params, ref, 2e-2, 0.05)
    for step, grad in enumerate(grads):
        # Drive torch's lr by hand with the value our on-device schedule produces at this step.
        lr = sched(torch.tensor(step)).item()
        for group in topt.param_groups:
            group["lr"] = lr
        _set_grads(ref, grad)
        topt.step()
    assert _max_diff(_run_ours(tx, params, grads), ref) <= ATOL


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping active / never active
def test_adamw_clipping_matches_clip_grad_norm(max_norm: float) -> None:
    params, ref, grads = _setup(4)
    tx = optim.chain(optim.clip_by_global_norm(max_norm), optim.adamw(1e-2, weight_decay=0.1))
    topt = _grouped_adamw(params, ref, 1e-2, 0.1)
    for grad in grads:
        _set_grads(ref, grad)
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        topt.step()
    assert _max_diff(_run_ours(tx, params, grads), ref) <= ATOL


def test_adamw_float32_close_to_torch() -> None:
    params, ref, grads = _setup(5)
    params = params.apply(lambda p: p.float())
    ref = [torch.nn.Parameter(p.detach().float()) for p in ref]
    grads = [g.apply(lambda t: t.float()) for g in grads]
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    topt = _grouped_adamw(params, ref, 1e-2, 0.1)
    for grad in grads:
        _set_grads(ref, grad)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        topt.step()
    assert _max_diff(_run_ours(tx, params, grads), ref) <= 1e-5


def test_update_does_not_modify_params() -> None:
    params, _, grads = _setup(6)
    before = params.clone()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = tx.init(params)
    tx.update(grads[0], state, params)
    for a, b in zip(T.leaves(params), T.leaves(before), strict=True):
        assert torch.equal(a, b)


def test_registry() -> None:
    assert optim.OPTIMIZERS["adamw"] is optim.adamw
    tx = optim.build_optimizer("adamw", learning_rate=1e-3, weight_decay=0.1)
    assert isinstance(tx, optim.GradientTransformation)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamz'.*adamw"):
        optim.build_optimizer("adamz", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"optimizer 'adamw'.*lr"):
        optim.build_optimizer("adamw", lr=1e-3)
