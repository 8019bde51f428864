"""Config records that build themselves: the optimizer half (schedules have theirs in
:mod:`tscale.optim.schedules`).

Each optimizer type has one frozen record beside its factory (``AdamWConfig`` in
:mod:`tscale.optim.alias`, ``LionConfig`` in :mod:`tscale.optim.lion`, ...): a ``type`` tag, the
fields that optimizer takes (declared with :func:`tscale.core.fields.field`: default, help text,
domain), its :class:`Capabilities` as data, and ``transform(learning_rate, mask)``, the one call
of its factory. The fields every optimizer shares and the assembly (clipping in front, the
non-finite guard around) live here, in :class:`OptimizerRecord`. The registry
``OPTIMIZER_CONFIGS`` (:mod:`tscale.optim.alias`) lists the records; the YAML ``optimizer:``
section is their tagged union, so adding an optimizer is one record and one registry entry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
from tensordict import TensorDictBase

from tscale.core.fields import domain_of, field
from tscale.optim.base import GradientTransformation, Schedule, chain
from tscale.optim.transforms import (
    MaskFn,
    NormFn,
    clip_by_global_norm,
    default_decay_mask,
    no_decay_mask,
    skip_nonfinite,
)

__all__ = [
    "CONFIG_MASK",
    "Capabilities",
    "OptimizerRecord",
    "by_type",
    "check_fields",
    "record",
    "union_of",
]

C = TypeVar("C", bound=type)


def _type_first(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    # A subclass redeclares `type` (its tag); keep it the first key in YAML and the docs.
    return sorted(fields, key=lambda f: f.name != "type")


def record(cls: C) -> C:
    """The decorator of config records: frozen, keyword-only, ``type`` first."""
    return attrs.frozen(kw_only=True, field_transformer=_type_first)(cls)


def check_fields(rec: Any) -> None:
    """Check every field of ``rec`` against the domain it declares (for a list or tuple field,
    each item); the loader checks YAML the same way, this covers records built in Python.

    Raises:
        ValueError: ``"<field>: must be ..., got ..."`` (``betas[0]: ...`` for an item).
    """
    for f in attrs.fields(type(rec)):
        domain = domain_of(f)
        if domain is None:
            continue
        value = getattr(rec, f.name)
        items = (
            [(f"{f.name}[{i}]", v) for i, v in enumerate(value)]
            if isinstance(value, Sequence) and not isinstance(value, str)
            else [(f.name, value)]
        )
        for name, v in items:
            problem = domain.check(v)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")


@attrs.frozen(kw_only=True)
class Capabilities:
    """What an optimizer needs from the step and the parallel wrappers, as data (read instead
    of the optimizer's name)."""

    elementwise: bool = True
    """The update of a tensor element depends only on that element's history (and scalars),
    so it runs on flat partitions and shards (FSDP, DeepSpeed ZeRO)."""
    needs_objective: bool = False
    """``update`` takes an extra argument computed from the loss (Sophia-G's ``hessian``)."""
    eval_params: bool = False
    """Evaluate other params than the trained ones (schedule-free's averaged iterate)."""
    needs_full_tensors: bool = False
    """The update needs each tensor whole, with its shape (Muon's orthogonalisation)."""
    replaces_schedule: bool = False
    """The optimizer takes a constant learning rate and warms up itself (schedule-free)."""


class _ConfigMask:
    def __repr__(self) -> str:
        return "CONFIG_MASK"


CONFIG_MASK: Any = _ConfigMask()
"""``build(mask=CONFIG_MASK)``: the decay mask of the record's ``no_decay`` field."""


@record
class OptimizerRecord:
    """The fields every optimizer takes, and the assembly; subclasses add ``type``, their own
    fields, ``capabilities`` and :meth:`transform`."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    factory: ClassVar[Callable[..., GradientTransformation]]
    """The optimizer's factory (``learning_rate`` first), for :data:`tscale.optim.OPTIMIZERS`."""

    lr: float | None = field(
        None,
        "Peak learning rate (prodigy: a factor on its estimated step size); null: 2e-5 with "
        "model.path (fine-tuning; 2e-4 with lora.enabled), 1e-3 from random init.",
        ge=0,
    )
    weight_decay: float = field(0.0, "Decoupled weight decay, scaled by the learning rate.", ge=0)
    no_decay: list[str] | None = field(
        None,
        "Regexes (re.search on dotted param names) of the params exempt from weight decay, e.g. "
        "['\\.bias$', 'norm', 'embed_tokens']; null: 1-D params and embed_tokens; []: none.",
    )
    max_grad_norm: float | None = field(
        1.0, "Clip gradients to this global L2 norm first; null: no clipping.", gt=0
    )
    skip_nonfinite: bool = field(
        True,
        "Drop a step whose gradients or updates hold NaN/inf: params and optimizer state stay "
        "as they were, and the step counts in the 'skipped' metric.",
    )

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        """The optimizer itself (no clipping, no guard): the one call of its factory."""
        raise NotImplementedError(f"{type(self).__name__}.transform")

    def decay_mask(self) -> MaskFn | None:
        """Which params decay: ``no_decay`` as a mask, else :func:`default_decay_mask`.

        Raises:
            ValueError: ``no_decay[i]: ...`` for a pattern that is not a regular expression.
        """
        if self.no_decay is None:
            return default_decay_mask
        for i, pattern in enumerate(self.no_decay):
            try:
                re.compile(pattern)
            except re.error as err:
                problem = f"{pattern!r} is not a valid regex: {err}"
                raise ValueError(f"no_decay[{i}]: {problem}") from None
        return no_decay_mask(self.no_decay)

    def build(
        self,
        schedule: float | Schedule,
        *,
        warmup_steps: int = 0,
        mask: MaskFn | None = CONFIG_MASK,
        norm_fn: NormFn | None = None,
        clip: bool = True,
    ) -> GradientTransformation:
        """``skip_nonfinite?(chain(clip_by_global_norm(max_grad_norm)?, transform))``.

        Args:
            schedule: the learning rate, a schedule ``step -> lr`` or a float.
            warmup_steps: the optimizer's own warmup (``capabilities.replaces_schedule``).
            mask: the decay mask; :data:`CONFIG_MASK` is the ``no_decay`` field's.
            norm_fn: the global norm of the clip when leaves are shards (FSDP).
            clip: False leaves clipping out (DeepSpeed clips across its partitions itself).

        Raises:
            ValueError: a field outside its domain or a value the factory rejects, the message
                starting with the field's name (``betas[0]: must be in [0, 1), got 1.5``).
            ImportError: the optimizer needs a package that is not installed.
        """
        check_fields(self)
        tx = self.transform(
            schedule,
            self.decay_mask() if mask is CONFIG_MASK else mask,
            warmup_steps=warmup_steps,
        )
        if clip and self.max_grad_norm is not None:
            tx = chain(clip_by_global_norm(self.max_grad_norm, norm_fn=norm_fn), tx)
        return skip_nonfinite(tx) if self.skip_nonfinite else tx

    def params_to_evaluate(
        self, params: TensorDictBase, opt_state: TensorDictBase
    ) -> TensorDictBase:
        """The params to evaluate and export (``capabilities.eval_params``: not ``params``)."""
        return params


def union_of(records: Sequence[type]) -> Any:
    """``records[0] | records[1] | ...``: a tagged union for the schema (the first member is
    the default type of a section that names none)."""
    return functools.reduce(lambda a, b: a | b, records)


def by_type(records: Sequence[type]) -> dict[str, type]:
    """``{tag: record}`` from each record's ``type`` default."""
    return {attrs.fields_dict(r)["type"].default: r for r in records}
