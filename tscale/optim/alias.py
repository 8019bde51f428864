"""Ready-made optimizers: AdamW, and the registry of every optimizer's config record.

Each optimizer module holds its factory and, beside it, its config record (``LionConfig`` in
:mod:`tscale.optim.lion`, ...). :data:`OPTIMIZER_CONFIGS` lists the records: it is the YAML
``optimizer:`` section's tagged union (:data:`OptimizerConfig`) and the factories by name
(:data:`OPTIMIZERS`). Adding an optimizer: a module with its factory and record, and one entry
here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from tscale.core.fields import field
from tscale.optim.adam8bit import AdamW8bitConfig, adamw_8bit
from tscale.optim.base import GradientTransformation
from tscale.optim.lion import LionConfig, lion
from tscale.optim.muon import MuonConfig, muon
from tscale.optim.prodigy import ProdigyConfig, prodigy
from tscale.optim.record import OptimizerRecord, by_type, record, union_of
from tscale.optim.schedule_free import ScheduleFreeAdamWConfig, schedule_free_adamw
from tscale.optim.sophia import SophiaGConfig, sophia_g
from tscale.optim.transforms import MaskFn, Schedule, decoupled, default_decay_mask, scale_by_adam

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_CONFIGS",
    "AdamWConfig",
    "OptimizerConfig",
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
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019).

    ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``; equal to
    ``torch.optim.AdamW`` (with no-decay param groups for the leaves ``mask`` rejects). Clip
    first with ``chain(clip_by_global_norm(max_norm), adamw(...))`` (``clip_grad_norm_``, then
    the step).

    Args:
        learning_rate: a float or a schedule ``step -> lr`` (see :mod:`tscale.optim.schedules`).
        b1, b2, eps: Adam's moment decay rates and denominator epsilon.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        mask: which leaves decay: :func:`default_decay_mask` (not norms, biases, embeddings),
            ``None`` for all, or a callable ``(name, tensor) -> bool``.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return decoupled(scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate, weight_decay, mask)


@record
class AdamWConfig(OptimizerRecord):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019);
    equals ``torch.optim.AdamW``."""

    factory = staticmethod(adamw)
    type: Literal["adamw"] = field("adamw", "AdamW (tscale.optim.adamw).")
    betas: tuple[float, float] = field((0.9, 0.999), "Moment decay rates [b1, b2].", ge=0, lt=1)
    eps: float = field(1e-8, "Denominator epsilon.", ge=0)

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return adamw(
            learning_rate, b1=b1, b2=b2, eps=self.eps, weight_decay=self.weight_decay, mask=mask
        )


OPTIMIZER_CONFIGS: tuple[type[OptimizerRecord], ...] = (
    AdamWConfig,  # first: the type of an `optimizer:` section that names none
    AdamW8bitConfig,
    LionConfig,
    ProdigyConfig,
    SophiaGConfig,
    ScheduleFreeAdamWConfig,
    MuonConfig,
)
"""The optimizer records, one per ``optimizer.type``."""

OptimizerConfig: Any = union_of(OPTIMIZER_CONFIGS)
"""The YAML ``optimizer:`` section: the tagged union of :data:`OPTIMIZER_CONFIGS`."""

OPTIMIZER_TYPES: dict[str, type[OptimizerRecord]] = by_type(OPTIMIZER_CONFIGS)
"""``{optimizer.type: record}``."""

OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    name: rec.factory for name, rec in OPTIMIZER_TYPES.items()
}
"""Optimizer factories by name, for Python users (every factory takes ``learning_rate``
first); the config goes through the records instead."""


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
