"""Learning-rate schedules: pure functions ``schedule(step) -> lr``.

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
from typing import Any

import torch

Schedule = Callable[[Any], Any]
"""``schedule(step) -> lr``: a Python int gives a float, a 0-d tensor gives a 0-d tensor."""

__all__ = [
    "SCHEDULES",
    "Schedule",
    "build_schedule",
    "constant",
    "cosine_decay",
    "join",
    "linear_warmup",
    "warmup_cosine",
]


# --------------------------------------------------------------------------------------------
# validation


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


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
    w = float(max(1, warmup_steps))

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            s = _as_float_tensor(step)
            return peak * torch.where(s < warmup_steps, torch.clamp(s / w, min=0.0), 1.0)
        if step < warmup_steps:
            return peak * (float(max(step, 0)) / w)
        return peak

    return schedule


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
    w = float(max(1, warmup_steps))
    d = float(max(1, total_steps - warmup_steps))

    def schedule(step):
        step = _check_step(step)
        if isinstance(step, torch.Tensor):
            s = _as_float_tensor(step)
            warm = torch.clamp(s / w, min=0.0)
            progress = torch.clamp((s - warmup_steps) / d, min=0.0, max=1.0)
            factor = torch.where(s < warmup_steps, warm, _cosine_factor_t(progress, min_lr_ratio))
            return peak * factor
        if step < warmup_steps:
            return peak * (float(max(step, 0)) / w)
        progress = min(max(float(step - warmup_steps) / d, 0.0), 1.0)
        return peak * _cosine_factor(progress, min_lr_ratio)

    return schedule


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
# builder

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def build_schedule(
    type: str,  # named as the config key `scheduler.type`
    peak: float,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """The schedule a config names: linear warmup to ``peak``, then ``constant`` or ``cosine``
    (down to ``peak * min_lr_ratio`` at ``total_steps``).

    Raises:
        ValueError: an unknown ``type`` (the message lists the valid ones), ``total_steps``
            missing for ``cosine``, or any invalid argument of the schedule.
    """
    if type == "constant":
        _ratio("min_lr_ratio", min_lr_ratio)
        return linear_warmup(peak, warmup_steps)
    if type == "cosine":
        if total_steps is None:
            raise ValueError("total_steps is required for a cosine schedule")
        return warmup_cosine(peak, warmup_steps, total_steps, min_lr_ratio)
    raise ValueError(f"unknown schedule type {type!r}; valid types: {', '.join(SCHEDULES)}")
