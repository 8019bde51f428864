"""Learning-rate schedules: pure functions ``schedule(step) -> lr``, and their config records.

A schedule accepts a Python ``int`` (and returns a Python ``float``) or a 0-d tensor (and returns a
0-d float32 tensor on the same device, computed with torch ops, so reading the optimizer's on-device
step count never waits for the device). Both paths compute the same formula; the int path follows
the operation order of ``transformers.get_cosine_schedule_with_warmup`` so that it matches it
exactly.

Warmup convention (as ``transformers``): ``lr(s) = peak * s / warmup_steps`` for ``s <
warmup_steps``, so the first step (``s = 0``) has learning rate 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch

from tscale.core.fields import field
from tscale.optim.base import Schedule
from tscale.optim.base import check_real as _real
from tscale.optim.record import by_type, check_fields, record, union_of

__all__ = [
    "DECAY_SHAPES",
    "SCHEDULES",
    "SCHEDULE_CONFIGS",
    "SCHEDULE_TYPES",
    "ConstantConfig",
    "CosineConfig",
    "CosineRestartsConfig",
    "InverseSqrtConfig",
    "LinearConfig",
    "PolynomialConfig",
    "RexConfig",
    "Schedule",
    "ScheduleRecord",
    "SchedulerConfig",
    "WSDConfig",
    "build_schedule",
    "constant",
    "cosine_decay",
    "inverse_sqrt",
    "join",
    "linear_warmup",
    "polynomial",
    "rex",
    "warmup_cosine",
    "warmup_cosine_restarts",
    "warmup_linear",
    "wsd",
]


# --------------------------------------------------------------------------------------------
# validation


def _nonneg(name: str, value: object) -> float:
    v = _real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def _steps(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _ratio(name: str, value: object) -> float:
    v = _real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _as_float_tensor(step: torch.Tensor) -> torch.Tensor:
    if step.ndim != 0:
        raise ValueError(f"a schedule takes a 0-d step tensor, got shape {tuple(step.shape)}")
    return step.to(torch.float32)


def _check_step(step: int | torch.Tensor) -> int | torch.Tensor:
    if isinstance(step, torch.Tensor):
        return step
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"a schedule takes an int or a 0-d tensor step, got {type(step).__name__}")
    return step


# --------------------------------------------------------------------------------------------
# schedules


def constant(value: float) -> Schedule:
    """``lr(step) = value``.

    Raises:
        ValueError: ``value`` negative or not finite.
    """
    value = _nonneg("value", value)

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            return torch.full((), value, dtype=torch.float32, device=step.device)
        return value

    return schedule


def linear_warmup(peak: float, warmup_steps: int) -> Schedule:
    """``peak * step / warmup_steps`` for ``step < warmup_steps``, then ``peak``.

    Raises:
        ValueError: ``peak`` negative or ``warmup_steps`` not a non-negative int.
    """
    peak = _nonneg("peak", peak)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    return _warmup_then(peak, warmup_steps, lambda step: 1.0, lambda s: 1.0)


def _cosine_factor(progress: float, min_ratio: float) -> float:
    # Same operation order as transformers' lambda: bit-identical on the int path.
    factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    factor = factor * (1 - min_ratio) + min_ratio
    return max(0.0, factor)


def _cosine_factor_t(progress: torch.Tensor, min_ratio: float) -> torch.Tensor:
    factor = 0.5 * (1.0 + torch.cos(math.pi * progress))
    return torch.clamp(factor * (1 - min_ratio) + min_ratio, min=0.0)


def cosine_decay(peak: float, decay_steps: int, min_ratio: float = 0.0) -> Schedule:
    """Half a cosine from ``peak`` at step 0 to ``peak * min_ratio`` at ``decay_steps``, flat
    after (Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017).

    Raises:
        ValueError: ``peak`` negative, ``decay_steps`` < 1 or ``min_ratio`` outside [0, 1].
    """
    peak = _nonneg("peak", peak)
    decay_steps = _steps("decay_steps", decay_steps, minimum=1)
    min_ratio = _ratio("min_ratio", min_ratio)

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            progress = torch.clamp(_as_float_tensor(step) / decay_steps, min=0.0, max=1.0)
            return peak * _cosine_factor_t(progress, min_ratio)
        progress = min(max(float(step), 0.0) / float(decay_steps), 1.0)
        return peak * _cosine_factor(progress, min_ratio)

    return schedule


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then a half cosine down to
    ``peak * min_lr_ratio`` at ``total_steps`` (flat after it).

    Equals ``transformers.get_cosine_schedule_with_warmup`` (with ``min_lr_rate=min_lr_ratio``) for
    steps ``<= total_steps``; transformers' cosine rises again after ``total_steps``, this one
    stays at the minimum.

    Raises:
        ValueError: ``peak`` negative, ``warmup_steps`` negative, ``total_steps <
            warmup_steps``, or ``min_lr_ratio`` outside [0, 1].
    """
    peak = _nonneg("peak", peak)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    total_steps = _steps("total_steps", total_steps)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
    d = float(max(1, total_steps - warmup_steps))

    def after(step: int) -> float:
        progress = min(max(float(step - warmup_steps) / d, 0.0), 1.0)
        return _cosine_factor(progress, min_lr_ratio)

    def after_t(s: torch.Tensor) -> torch.Tensor:
        progress = torch.clamp((s - warmup_steps) / d, min=0.0, max=1.0)
        return _cosine_factor_t(progress, min_lr_ratio)

    return _warmup_then(peak, warmup_steps, after, after_t)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, with its step counted from there
    (``optax.join_schedules`` semantics: ``schedules[i + 1](step - boundaries[i])`` once
    ``step >= boundaries[i]``).

    Raises:
        ValueError: ``len(boundaries) != len(schedules) - 1``, a schedule not callable, or
            boundaries not non-negative increasing ints.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise ValueError("schedules must not be empty")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join needs len(boundaries) == len(schedules) - 1, got {len(boundaries)} boundaries "
            f"for {len(schedules)} schedules"
        )
    for i, s in enumerate(schedules):
        if not callable(s):
            raise ValueError(f"schedules[{i}] must be callable (step -> lr), got {s!r}")
    for i, b in enumerate(boundaries):
        _steps(f"boundaries[{i}]", b)
        if i and b < boundaries[i - 1]:
            raise ValueError(f"boundaries must be non-decreasing, got {boundaries}")

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            out = torch.as_tensor(schedules[0](step), dtype=torch.float32, device=step.device)
            for b, s in zip(boundaries, schedules[1:], strict=True):
                nxt = torch.as_tensor(s(step - b), dtype=torch.float32, device=step.device)
                out = torch.where(step < b, out, nxt)
            return out
        out = schedules[0](step)
        for b, s in zip(boundaries, schedules[1:], strict=True):
            if step >= b:
                out = s(step - b)
        return out

    return schedule


# --------------------------------------------------------------------------------------------
# warmup, then a decay


def _warmup_then(
    peak: float,
    warmup_steps: int,
    after: Callable[[int], float],
    after_t: Callable[[torch.Tensor], torch.Tensor],
) -> Schedule:
    """Linear warmup from 0 to ``peak`` (transformers' convention), then ``peak * after(step)``.

    ``after`` (int path) and ``after_t`` (tensor path) take the *absolute* step, as transformers'
    lambdas do, and return the factor of the peak; ``after_t`` may misbehave before the warmup
    ends, where its value is discarded by ``torch.where``.
    """
    w = float(max(1, warmup_steps))

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            s = _as_float_tensor(step)
            warm = torch.clamp(s / w, min=0.0)
            return peak * torch.where(s < warmup_steps, warm, after_t(s))
        if step < warmup_steps:
            return peak * (float(max(step, 0)) / w)
        return peak * after(step)

    return schedule


def _budget(
    peak: object, warmup_steps: object, total_steps: object, min_lr_ratio: object
) -> tuple[float, int, int, float]:
    """Validated ``(peak, warmup_steps, total_steps, min_lr_ratio)`` of a decaying schedule."""
    peak = _nonneg("peak", peak)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    total_steps = _steps("total_steps", total_steps)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    return peak, warmup_steps, total_steps, _ratio("min_lr_ratio", min_lr_ratio)


def warmup_linear(
    peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warmup to ``peak``, then a straight line down to ``peak * min_lr_ratio`` at
    ``total_steps`` (flat after it).

    Equals ``transformers.get_linear_schedule_with_warmup`` when ``min_lr_ratio=0`` (bit for bit
    on the int path).

    Raises:
        ValueError: ``peak`` negative, ``warmup_steps`` negative, ``total_steps <
            warmup_steps``, or ``min_lr_ratio`` outside [0, 1].
    """
    peak, warmup_steps, total_steps, r = _budget(peak, warmup_steps, total_steps, min_lr_ratio)
    d = float(max(1, total_steps - warmup_steps))

    def after(step: int) -> float:
        # transformers' operation order; "* (1 - r) + r" is exact when r == 0
        return max(0.0, float(total_steps - step) / d) * (1 - r) + r

    def after_t(s: torch.Tensor) -> torch.Tensor:
        return torch.clamp((total_steps - s) / d, min=0.0, max=1.0) * (1 - r) + r

    return _warmup_then(peak, warmup_steps, after, after_t)


def warmup_cosine_restarts(
    peak: float,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """Linear warmup, then ``num_cycles`` half-cosines from ``peak`` down to ``peak *
    min_lr_ratio``, each restarting at ``peak`` (hard restarts; Loshchilov & Hutter, "SGDR:
    Stochastic Gradient Descent with Warm Restarts", ICLR 2017); ``peak * min_lr_ratio`` from
    ``total_steps`` on.

    Equals ``transformers.get_cosine_with_hard_restarts_schedule_with_warmup`` when
    ``min_lr_ratio=0`` (bit for bit on the int path).

    Raises:
        ValueError: as :func:`warmup_linear`, or ``num_cycles`` not an int >= 1.
    """
    peak, warmup_steps, total_steps, r = _budget(peak, warmup_steps, total_steps, min_lr_ratio)
    num_cycles = _steps("num_cycles", num_cycles, minimum=1)
    d = float(max(1, total_steps - warmup_steps))

    def after(step: int) -> float:
        progress = float(step - warmup_steps) / d
        if progress >= 1.0:
            return 0.0 * (1 - r) + r
        cycle = (float(num_cycles) * progress) % 1.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycle))) * (1 - r) + r

    def after_t(s: torch.Tensor) -> torch.Tensor:
        progress = torch.clamp((s - warmup_steps) / d, min=0.0)
        cycle = torch.remainder(num_cycles * progress, 1.0)
        factor = torch.clamp(0.5 * (1.0 + torch.cos(math.pi * cycle)), min=0.0)
        return torch.where(progress >= 1.0, 0.0, factor) * (1 - r) + r

    return _warmup_then(peak, warmup_steps, after, after_t)


DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt")
"""The decay shapes of :func:`wsd` (transformers' names)."""


def _shape_factor(shape: str, progress: float) -> float:
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":  # transformers' operation order (num_cycles = 0.5)
        return 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    return 1.0 - math.sqrt(progress)


def _shape_factor_t(shape: str, progress: torch.Tensor) -> torch.Tensor:
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + torch.cos(math.pi * progress))
    return 1.0 - torch.sqrt(progress)


def wsd(
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
    decay_shape: str = "1-sqrt",
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """Warmup-stable-decay: linear warmup, ``peak`` until the last ``round(decay_fraction *
    total_steps)`` steps, then a decay of ``decay_shape`` (``linear``, ``cosine`` or ``1-sqrt``)
    down to ``peak * min_lr_ratio`` at ``total_steps`` (flat after it).

    Hu et al., "MiniCPM: Unveiling the Potential of Small Language Models" (2024); Hägele et al.,
    "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations" (2024), whose
    best cooldown is ``1-sqrt``. Equals ``transformers.get_wsd_schedule(num_warmup_steps,
    num_decay_steps=round(decay_fraction * total_steps), num_training_steps=total_steps,
    decay_type=decay_shape, min_lr_ratio=...)`` from the end of the warmup on (bit for bit on the
    int path), and everywhere when ``min_lr_ratio=0``: transformers' warmup starts at ``peak *
    min_lr_ratio``, this one at 0 like every schedule here.

    Raises:
        ValueError: as :func:`warmup_linear`; ``decay_fraction`` outside [0, 1];
            ``decay_shape`` not one of :data:`DECAY_SHAPES`; warmup and decay longer than
            ``total_steps``.
    """
    peak, warmup_steps, total_steps, r = _budget(peak, warmup_steps, total_steps, min_lr_ratio)
    decay_fraction = _ratio("decay_fraction", decay_fraction)
    if decay_shape not in DECAY_SHAPES:
        shapes = ", ".join(DECAY_SHAPES)
        raise ValueError(f"decay_shape must be one of {shapes}, got {decay_shape!r}")
    decay_steps = round(decay_fraction * total_steps)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"decay_fraction {decay_fraction} makes {decay_steps} decay steps, which with "
            f"warmup_steps ({warmup_steps}) exceed total_steps ({total_steps})"
        )
    stable_end = total_steps - decay_steps
    dd = float(max(1, decay_steps))

    def after(step: int) -> float:
        if step < stable_end:
            return 1.0
        if step < total_steps:
            progress = float(step - stable_end) / dd
            return max(0.0, _shape_factor(decay_shape, progress) * (1.0 - r) + r)
        return r

    def after_t(s: torch.Tensor) -> torch.Tensor:
        progress = torch.clamp((s - stable_end) / dd, min=0.0, max=1.0)
        decay = torch.clamp(_shape_factor_t(decay_shape, progress) * (1.0 - r) + r, min=0.0)
        return torch.where(s < stable_end, 1.0, torch.where(s < total_steps, decay, r))

    return _warmup_then(peak, warmup_steps, after, after_t)


def rex(peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> Schedule:
    """Linear warmup, then the REX profile ``(1 - z) / (1/2 + (1 - z)/2)`` of the progress ``z``
    from 0 to 1 over the remaining steps, scaled to end at ``peak * min_lr_ratio`` (flat after).

    Chen, Wolfe & Kyrillidis, "REX: Revisiting Budgeted Training with an Improved Schedule"
    (MLSys 2022): a decay that stays higher than linear early and drops faster at the end.

    Raises:
        ValueError: as :func:`warmup_linear`.
    """
    peak, warmup_steps, total_steps, r = _budget(peak, warmup_steps, total_steps, min_lr_ratio)
    d = float(max(1, total_steps - warmup_steps))

    def after(step: int) -> float:
        left = 1.0 - min(max(float(step - warmup_steps) / d, 0.0), 1.0)
        return left / (0.5 + 0.5 * left) * (1 - r) + r

    def after_t(s: torch.Tensor) -> torch.Tensor:
        left = 1.0 - torch.clamp((s - warmup_steps) / d, min=0.0, max=1.0)
        return left / (0.5 + 0.5 * left) * (1 - r) + r

    return _warmup_then(peak, warmup_steps, after, after_t)


def inverse_sqrt(peak: float, warmup_steps: int, timescale: int | None = None) -> Schedule:
    """Linear warmup, then ``peak / sqrt((step - warmup_steps + timescale) / timescale)``
    (Vaswani et al., "Attention Is All You Need", 2017, with a timescale as in T5).

    ``timescale`` defaults to ``warmup_steps`` (or 10 000 without warmup), as
    ``transformers.get_inverse_sqrt_schedule``, which this equals bit for bit on the int path.
    No end: the rate keeps falling as ``1/sqrt(step)``.

    Raises:
        ValueError: ``peak`` negative, ``warmup_steps`` negative, ``timescale`` not an int >= 1.
    """
    peak = _nonneg("peak", peak)
    warmup_steps = _steps("warmup_steps", warmup_steps)
    if timescale is None:
        timescale = warmup_steps or 10_000
    timescale = _steps("timescale", timescale, minimum=1)
    shift = timescale - warmup_steps

    def after(step: int) -> float:
        return 1.0 / math.sqrt((step + shift) / timescale)

    def after_t(s: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt((torch.clamp(s, min=warmup_steps) + shift) / timescale)

    return _warmup_then(peak, warmup_steps, after, after_t)


def polynomial(
    peak: float,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """Linear warmup, then ``(peak - end) * (1 - progress) ** power + end`` with ``end = peak *
    min_lr_ratio``, reached at ``total_steps`` (flat after it).

    Equals ``transformers.get_polynomial_decay_schedule_with_warmup(..., lr_end=peak *
    min_lr_ratio, power=power)`` (bit for bit on the int path).

    Raises:
        ValueError: as :func:`warmup_linear`, or ``power`` not a positive number.
    """
    peak, warmup_steps, total_steps, r = _budget(peak, warmup_steps, total_steps, min_lr_ratio)
    power = _real("power", power)
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power!r}")
    end = peak * r
    d = max(1, total_steps - warmup_steps)

    def after(step: int) -> float:
        if peak == 0.0:
            return 0.0
        if step > total_steps:
            return end / peak
        # transformers' operation order: the factor is the rate divided by the peak
        remaining = 1 - (step - warmup_steps) / d
        return ((peak - end) * remaining**power + end) / peak

    def after_t(s: torch.Tensor) -> torch.Tensor:
        if peak == 0.0:
            return torch.zeros_like(s)
        remaining = torch.clamp(1.0 - (s - warmup_steps) / d, min=0.0, max=1.0)
        return ((peak - end) * remaining**power + end) / peak

    return _warmup_then(peak, warmup_steps, after, after_t)


# --------------------------------------------------------------------------------------------
# config records: one per `scheduler.type`, each building its schedule


@record
class ScheduleRecord:
    """The field every schedule takes; subclasses add ``type``, their fields and
    :meth:`build`."""

    warmup_steps: int = field(0, "Linear warmup from 0 to the peak learning rate.", ge=0)

    def build(self, peak: float, total_steps: int | None) -> Schedule:
        """The schedule from 0 to ``peak`` over the warmup, then this type's shape, ending at
        ``total_steps`` (the run's length; unused by the types that do not end).

        Raises:
            ValueError: a field outside its domain (``"<field>: must be ..."``), or an argument
                the schedule rejects.
        """
        check_fields(self)
        if self.ends and total_steps is None:
            raise ValueError(f"total_steps is required for a {self.type} schedule")
        if self.ends and total_steps is not None and self.warmup_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds the {total_steps} steps of the run"
            )
        return self._schedule(peak, total_steps or 0)

    ends: ClassVar[bool] = True
    """The type decays to its end at ``total_steps``."""
    type: ClassVar[str]

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        raise NotImplementedError(f"{type(self).__name__}._schedule")


_RATIO_HELP = "Final learning rate as a fraction of the peak."


@record
class ConstantConfig(ScheduleRecord):
    """The peak after the warmup."""

    ends: ClassVar[bool] = False
    type: Literal["constant"] = field("constant", "The peak after the warmup.")

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return linear_warmup(peak, self.warmup_steps)


@record
class CosineConfig(ScheduleRecord):
    """Half a cosine to the minimum (transformers'
    ``get_cosine_schedule_with_warmup``)."""

    type: Literal["cosine"] = field("cosine", "Half a cosine down to the minimum.")
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return warmup_cosine(peak, self.warmup_steps, total_steps, self.min_lr_ratio)


@record
class CosineRestartsConfig(ScheduleRecord):
    """``scheduler.type: cosine_restarts``: ``num_cycles`` half cosines, each restarting at the
    peak (SGDR)."""

    type: Literal["cosine_restarts"] = field("cosine_restarts", "Cosines with hard restarts.")
    num_cycles: int = field(1, "Cosine cycles, each restarting at the peak.", ge=1)
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return warmup_cosine_restarts(
            peak, self.warmup_steps, total_steps, self.num_cycles, self.min_lr_ratio
        )


@record
class LinearConfig(ScheduleRecord):
    """A straight line to the minimum."""

    type: Literal["linear"] = field("linear", "A straight line down to the minimum.")
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return warmup_linear(peak, self.warmup_steps, total_steps, self.min_lr_ratio)


@record
class WSDConfig(ScheduleRecord):
    """Warmup-stable-decay; the last ``decay_fraction`` of the run
    decays with ``decay_shape``."""

    type: Literal["wsd"] = field("wsd", "Warmup, the peak, then a decay at the end.")
    decay_fraction: float = field(
        0.2, "Fraction of train.max_steps spent decaying at the end.", ge=0, le=1
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = field("1-sqrt", "Shape of the decay.")
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        decay_steps = round(self.decay_fraction * total_steps)
        if self.warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"decay_fraction {self.decay_fraction} makes {decay_steps} decay steps, which "
                f"with warmup_steps ({self.warmup_steps}) exceed the {total_steps} steps of the run"
            )
        return wsd(
            peak,
            self.warmup_steps,
            total_steps,
            self.decay_fraction,
            self.decay_shape,
            self.min_lr_ratio,
        )


@record
class RexConfig(ScheduleRecord):
    """``scheduler.type: rex``: ``(1 - z) / (1/2 + (1 - z)/2)`` of the progress ``z`` (Chen et
    al. 2022)."""

    type: Literal["rex"] = field("rex", "The REX profile down to the minimum.")
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return rex(peak, self.warmup_steps, total_steps, self.min_lr_ratio)


@record
class InverseSqrtConfig(ScheduleRecord):
    """``scheduler.type: inverse_sqrt``: ``peak / sqrt((step - warmup + timescale) /
    timescale)``, no end."""

    ends: ClassVar[bool] = False
    type: Literal["inverse_sqrt"] = field("inverse_sqrt", "Falls as 1/sqrt(step), no end.")
    timescale: int | None = field(
        None,
        "lr = peak / sqrt((step - warmup_steps + timescale) / timescale); null: warmup_steps "
        "(10000 without warmup).",
        ge=1,
    )

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return inverse_sqrt(peak, self.warmup_steps, self.timescale)


@record
class PolynomialConfig(ScheduleRecord):
    """``scheduler.type: polynomial``: ``(peak - end) * (1 - z) ** power + end``."""

    type: Literal["polynomial"] = field("polynomial", "A polynomial decay to the minimum.")
    power: float = field(1.0, "Exponent of the decay (1: linear).", gt=0)
    min_lr_ratio: float = field(0.0, _RATIO_HELP, ge=0, le=1)

    def _schedule(self, peak: float, total_steps: int) -> Schedule:
        return polynomial(peak, self.warmup_steps, total_steps, self.power, self.min_lr_ratio)


SCHEDULE_CONFIGS: tuple[type[ScheduleRecord], ...] = (
    CosineConfig,  # first: the type of a `scheduler:` section that names none
    ConstantConfig,
    CosineRestartsConfig,
    LinearConfig,
    WSDConfig,
    RexConfig,
    InverseSqrtConfig,
    PolynomialConfig,
)
"""The schedule records, one per ``scheduler.type``."""

SchedulerConfig: Any = union_of(SCHEDULE_CONFIGS)
"""The YAML ``scheduler:`` section: the tagged union of :data:`SCHEDULE_CONFIGS`."""

SCHEDULE_TYPES: dict[str, type[ScheduleRecord]] = by_type(SCHEDULE_CONFIGS)
"""``{scheduler.type: record}``."""

SCHEDULES: tuple[str, ...] = tuple(SCHEDULE_TYPES)
"""The schedule types (the config's ``scheduler.type``)."""


def build_schedule(
    type: str,  # named as the config key `scheduler.type`
    peak: float,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    **fields: Any,
) -> Schedule:
    """The schedule a config names: ``SCHEDULE_TYPES[type](warmup_steps=..., **fields)
    .build(peak, total_steps)``; ``fields`` are the type's own (``min_lr_ratio``,
    ``decay_shape`` ...).

    Raises:
        ValueError: an unknown ``type`` (the message lists the valid ones), a field the type
            does not take, ``total_steps`` missing for a type that decays over it, or any
            invalid value.
    """
    if type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {type!r}; valid types: {', '.join(SCHEDULES)}")
    try:
        rec = SCHEDULE_TYPES[type](warmup_steps=warmup_steps, **fields)
    except TypeError as err:
        raise ValueError(f"schedule {type!r}: {err}") from None
    return rec.build(peak, total_steps)
