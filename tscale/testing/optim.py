"""Shared scaffolding of optimizer tests: a small tree named like a model's params, the names
the default decay mask selects, and a dispatch mode that fails on host syncs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DECAYED", "NAMED_SHAPES", "NoHostSync"]

NAMED_SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (11, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.0.mlp.up_proj.bias": (6,),
    "model.norm.weight": (4,),
    "model.gate": (),
    "lm_head.weight": (11, 4),
}
"""Leaves named like a transformer's (embedding, matrices, a bias, a norm, a scalar, the head):
what decay masks and Muon's routing look at."""

DECAYED: frozenset[str] = frozenset(
    k for k, s in NAMED_SHAPES.items() if len(s) >= 2 and "embed_tokens" not in k
)
"""The leaves of :data:`NAMED_SHAPES` that ``default_decay_mask`` decays, written out."""


class NoHostSync(TorchDispatchMode):
    """Raise on any op that copies a tensor value to a Python scalar (``.item()``, ``float(t)``,
    ``bool(t)``, hence ``if t:``) while the mode is active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))
