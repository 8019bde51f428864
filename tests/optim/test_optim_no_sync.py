"""No host sync: an optimizer update never reads a tensor value on the host.

A TorchDispatchMode fails on ``aten._local_scalar_dense`` — what ``.item()``, ``float(t)``,
``int(t)`` and ``bool(t)`` (hence ``if t:``) all reach — while the update runs. Every registered
optimizer runs under it in tests/optim/test_optimizer_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from tscale import optim
from tscale.testing.optim import NoHostSync


def test_mode_catches_item() -> None:
    t = torch.ones(())
    for read in (lambda: t.item(), lambda: float(t), lambda: bool(t)):
        with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            read()


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
