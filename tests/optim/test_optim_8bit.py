"""adamw_8bit against bitsandbytes.optim.AdamW8bit on CPU (same gradients, 20 steps).

Tolerances on the params are those of bitsandbytes' own ``test_optimizer8bit`` (its float32
case: mean abs error < 6e-5, mean relative error < 6e-4, ``isclose(atol=1e-5, rtol=1e-3)``
everywhere); the moments must match its state bit for bit (same codes, same absmax), since both
run the same float32 operations on the same gradients.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T

bnb = pytest.importorskip("bitsandbytes")

STEPS = 20
SHAPES = {  # two quantised leaves (one with a partial last block), two float32 ones
    "model.layers.0.mlp.up_proj.weight": (64, 128),
    "model.layers.0.odd": (4113,),
    "model.layers.0.small.weight": (32, 16),
    "model.norm.weight": (64,),
}


def _setup(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    flat = {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in SHAPES.items()}
    params = T.unflatten({k: v.clone() for k, v in flat.items()})
    grads = [
        params.apply(lambda p: (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
        for _ in range(STEPS)
    ]
    return params, flat, grads


def _key(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


def test_matches_bitsandbytes_adamw8bit() -> None:
    params, flat, grads = _setup(0)
    names = T.leaf_keys(params)
    ref = [torch.nn.Parameter(flat[n].clone()) for n in names]
    topt = bnb.optim.AdamW8bit(ref, lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
    tx = optim.adamw_8bit(1e-3, b1=0.9, b2=0.995, eps=1e-8, weight_decay=0.01, mask=None)
    state = tx.init(params)
    for grad in grads:
        for p, g in zip(ref, T.leaves(grad), strict=True):
            p.grad = g.clone()
        topt.step()
        updates, state = tx.update(grad.clone(), state, params)
        optim.apply_updates(params, updates)

        adam = state["0"]
        for name, p, r in zip(names, T.leaves(params), ref, strict=True):
            theirs = topt.state[r]
            ours1, ours2 = adam["state1"][_key(name)], adam["state2"][_key(name)]
            assert ours1.dtype == theirs["state1"].dtype and ours1.shape == theirs["state1"].shape
            assert torch.equal(ours1, theirs["state1"]), name
            assert torch.equal(ours2, theirs["state2"]), name
            if ours1.dtype == torch.uint8:
                assert torch.equal(adam["absmax1"][_key(name)], theirs["absmax1"]), name
                assert torch.equal(adam["absmax2"][_key(name)], theirs["absmax2"]), name
                assert torch.equal(adam["qmap1"], theirs["qmap1"])
                assert torch.equal(adam["qmap2"], theirs["qmap2"])
            err = (p - r).abs()
            assert err.mean() < 6e-5 and (err / (r.abs() + 1e-9)).mean() < 6e-4, name
            assert torch.isclose(p, r, atol=1e-5, rtol=1e-3).all(), name
            assert err.max() < 1e-6, name  # in fact a few float32 ulps
    assert int(state["0"]["count"]) == STEPS


def _dequantized(adam: TensorDict, which: int, name: str, block_size: int) -> torch.Tensor:
    codes = adam[f"state{which}"][_key(name)]
    if codes.dtype != torch.uint8:
        return codes
    return bnb.functional.dequantize_blockwise(
        codes,
        absmax=adam[f"absmax{which}"][_key(name)],
        code=adam[f"qmap{which}"],
        blocksize=block_size,
    )


@pytest.mark.parametrize("block_size", [64, 256, 2048])
def test_close_to_float32_adamw(block_size: int) -> None:
    # bitsandbytes' test_optimizer8bit protocol against 32-bit torch.optim.AdamW: compare the
    # moments and params after each step, then copy ours into the reference so that the errors
    # measured are those of one step
    params, flat, grads = _setup(1)
    names = T.leaf_keys(params)
    ref = [torch.nn.Parameter(flat[n].clone()) for n in names]
    topt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
    tx = optim.adamw_8bit(1e-3, weight_decay=0.01, mask=None, block_size=block_size)
    state = tx.init(params)
    for grad in grads:
        for p, g in zip(ref, T.leaves(grad), strict=True):
            p.grad = g.clone()
        topt.step()
        updates, state = tx.update(grad.clone(), state, params)
        optim.apply_updates(params, updates)
        for name, p, r in zip(names, T.leaves(params), ref, strict=True):
            for which, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                ours = _dequantized(state["0"], which, name, block_size)
                theirs = topt.state[r][key]
                assert (~torch.isclose(theirs, ours, atol=3e-3, rtol=1e-3)).sum() < 20
                theirs.copy_(ours)
            err = (p - r.detach()).abs()
            assert err.mean() < 6e-5 and (err / (r.detach().abs() + 1e-9)).mean() < 6e-4
            assert torch.isclose(p, r.detach(), atol=1e-5, rtol=1e-3).all(), name
            r.data.copy_(p)


def test_state_layout_and_bytes_per_param() -> None:
    params = T.unflatten(
        {"a.weight": torch.zeros(256, 512), "b.weight": torch.zeros(512, 256), "n": torch.ones(8)}
    )
    state = optim.scale_by_adam_8bit().init(params)
    assert state["state1", "a", "weight"].dtype == torch.uint8
    assert state["state2", "b", "weight"].shape == (512, 256)
    assert state["state1", "n"].dtype == torch.float32  # < min_8bit_size: float32, as bnb
    assert T.leaf_keys(state["absmax1"]) == ["a.weight", "b.weight"]
    assert state["absmax1", "a", "weight"].shape == (512,)
    assert state["qmap1"].shape == state["qmap2"].shape == (256,)
    per_param = T.num_bytes(state) / T.num_elements(params)
    assert per_param <= 2.1, per_param
    odd = optim.scale_by_adam_8bit(block_size=64, min_8bit_size=10).init(
        T.unflatten({"w": torch.zeros(130)})
    )
    assert odd["absmax2", "w"].shape == (3,)  # ceil(130 / 64)


def test_low_precision_params_keep_their_dtype() -> None:
    params, _, grads = _setup(2, torch.bfloat16)
    tx = optim.adamw_8bit(optim.warmup_cosine(1e-2, 2, STEPS), weight_decay=0.1)
    state = tx.init(params)
    for grad in grads[:4]:
        updates, state = tx.update(grad, state, params)
        assert [u.dtype for u in T.leaves(updates)] == [torch.bfloat16] * len(SHAPES)
        optim.apply_updates(params, updates)
    assert all(bool(torch.isfinite(p).all()) for p in T.leaves(params))


def test_registry_and_validation() -> None:
    assert optim.OPTIMIZERS["adamw_8bit"] is optim.adamw_8bit
    tx = optim.build_optimizer("adamw_8bit", learning_rate=1e-3, block_size=128)
    assert isinstance(tx, optim.GradientTransformation)
    for kwargs, match in [
        ({"block_size": 100}, "block_size must be one of 64, 128"),
        ({"block_size": True}, "block_size"),
        ({"min_8bit_size": 0}, "min_8bit_size"),
        ({"b1": 1.0}, "b1"),
        ({"eps": -1.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            optim.scale_by_adam_8bit(**kwargs)
    with pytest.raises(ValueError, match=r"integer.*dtype"):
        optim.scale_by_adam_8bit().init(TensorDict({"integer": torch.zeros(3, dtype=torch.int64)}))
