"""No host sync: an optimizer update never reads a tensor value on the host.

A TorchDispatchMode fails on ``aten._local_scalar_dense`` — what ``.item()``, ``float(t)``,
``int(t)`` and ``bool(t)`` (hence ``if t:``) all reach — while the update runs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tscale import optim
from tscale.core import tree as T


class NoHostSync(TorchDispatchMode):
    """Raise on any op that copies a tensor value to a Python scalar."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError(f"host sync: {func} called inside an optimizer update")
        return func(*args, **(kwargs or {}))


def test_mode_catches_item() -> None:
    t = torch.ones(())
    for read in (lambda: t.item(), lambda: float(t), lambda: bool(t)):
        with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            read()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_adamw_update_has_no_host_sync(dtype: torch.dtype) -> None:
    params = T.unflatten(
        {
            "model.embed_tokens.weight": torch.randn(7, 3, dtype=dtype),
            "model.layers.0.mlp.up_proj.weight": torch.randn(5, 3, dtype=dtype),
            "model.norm.weight": torch.randn(3, dtype=dtype),
        }
    )
    sched = optim.join([optim.build_schedule("cosine", 1e-2, 2, 6, 0.1), optim.constant(1e-4)], [6])
    tx = optim.adamw(sched, weight_decay=0.1, max_grad_norm=0.5)
    state = tx.init(params)
    for _ in range(8):
        grads = params.apply(torch.randn_like)
        with NoHostSync():
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        assert all(isinstance(u, torch.Tensor) for u in T.leaves(updates))
    assert all(bool(torch.isfinite(p).all()) for p in T.leaves(params))


def test_schedules_on_tensors_have_no_host_sync() -> None:
    step = torch.tensor(5)
    for sched in (
        optim.constant(1.0),
        optim.linear_warmup(1.0, 10),
        optim.cosine_decay(1.0, 10, 0.1),
        optim.warmup_cosine(1.0, 3, 10, 0.1),
        optim.join([optim.linear_warmup(1.0, 3), optim.cosine_decay(1.0, 7)], [3]),
    ):
        with NoHostSync():
            out = sched(step)
        assert isinstance(out, torch.Tensor)
