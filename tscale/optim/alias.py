"""Ready-made optimizers: chains of transforms, and a registry that builds them by name."""

from __future__ import annotations

from collections.abc import Callable

from tscale.optim.adam8bit import adamw_8bit
from tscale.optim.base import GradientTransformation
from tscale.optim.lion import lion
from tscale.optim.muon import muon
from tscale.optim.prodigy import prodigy
from tscale.optim.schedule_free import schedule_free_adamw
from tscale.optim.sophia import sophia_g
from tscale.optim.transforms import (
    MaskFn,
    NormFn,
    Schedule,
    clip_then,
    decayed_and_scaled,
    default_decay_mask,
    scale_by_adam,
)

__all__ = [
    "OPTIMIZERS",
    "adamw",
    "adamw_8bit",
    "build_optimizer",
    "lion",
    "muon",
    "prodigy",
    "schedule_free_adamw",
    "sophia_g",
]


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskFn | None = default_decay_mask,
    max_grad_norm: float | None = None,
    norm_fn: NormFn | None = None,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019), optionally after global-norm gradient clipping.

    ``chain(clip_by_global_norm(max_norm)?, scale_by_adam, add_decayed_weights, scale_by_lr)``;
    equal to ``clip_grad_norm_`` followed by ``torch.optim.AdamW`` (with no-decay param groups
    for the leaves ``mask`` rejects).

    Args:
        learning_rate: a float or a schedule ``step -> lr`` (see :mod:`tscale.optim.schedules`).
        b1, b2, eps: Adam's moment decay rates and denominator epsilon.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        mask: which leaves decay: :func:`default_decay_mask` (not norms, biases, embeddings),
            ``None`` for all, or a callable ``(name, tensor) -> bool``.
        max_grad_norm: clip gradients to this global L2 norm first; ``None`` disables clipping.
        norm_fn: the global-norm function of the clip (FSDP: summed across shards; see
            :func:`~tscale.optim.transforms.clip_by_global_norm`).

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return clip_then(
        max_grad_norm,
        *decayed_and_scaled(
            scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate, weight_decay, mask
        ),
        norm_fn=norm_fn,
    )


OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    "adamw": adamw,
    "adamw_8bit": adamw_8bit,
    "lion": lion,
    "prodigy": prodigy,
    "sophia_g": sophia_g,
    "schedule_free_adamw": schedule_free_adamw,
    "muon": muon,
}
"""Optimizer factories by name (the config's ``optimizer.type``). Every factory takes
``learning_rate`` first; the config builder passes each the keyword arguments its signature
names."""


def build_optimizer(name: str, **kwargs: object) -> GradientTransformation:
    """Build the optimizer registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names), or the
            factory rejects an argument.
    """
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {name!r}: {err}") from None
