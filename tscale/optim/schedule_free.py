"""Schedule-Free AdamW: no learning-rate schedule, the averaging replaces it.

Defazio et al., "The Road Less Scheduled" (NeurIPS 2024, arXiv:2405.15682), Algorithm 1, in the
form of the authors' ``AdamWScheduleFreeReference``. Three sequences: ``z`` (the base AdamW-style
iterate), ``x`` (a weighted average of the ``z``) and ``y`` (their interpolation, where the
gradient is taken). At step ``k = 0, 1, ...``::

    lr_k     = lr * min(1, (k + 1) / warmup_steps) * sqrt(1 - b2^(k + 1))
    lr_max   = max(lr_max, lr_k)
    w_k      = (k + 1)^r * lr_max^weight_lr_power ;  c = w_k / sum_{i <= k} w_i
    v        = b2 v + (1 - b2) g^2                       (g taken at y)
    z_{k+1}  = z_k - lr_k (g / (sqrt(v) + eps) + wd * y_k)
    x_{k+1}  = (1 - c) x_k + c z_{k+1}
    y_{k+1}  = (1 - b1) z_{k+1} + b1 x_{k+1}

**The params the step trains on are y.** ``x`` is not stored: it follows from ``y`` and ``z``
(``x = (y - (1 - b1) z) / b1``), and the update adds ``y_{k+1} - y_k = c (z_k - y_k) +
lr_k (b1 (1 - c) - 1) u`` to the params. **Evaluate (and export) x**, which
:func:`schedule_free_eval_params` returns; do not evaluate the training params.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.core.fields import field
from tscale.optim.base import GradientTransformation, chain, empty_state
from tscale.optim.record import Capabilities, OptimizerRecord, record
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    _check_beta,
    _check_float_params,
    _check_real,
    _check_structure,
    _lr_source,
    _lr_tensor,
    _moment_dtype,
    _new_count,
    _positive,
    _scalar_dtype,
    add_decayed_weights,
    default_decay_mask,
)

__all__ = [
    "ScheduleFreeAdamWConfig",
    "scale_by_schedule_free_adamw",
    "schedule_free_adamw",
    "schedule_free_eval_params",
]

_MARKER = "weight_sum"  # a state holding "z" and this key is a schedule-free state


def _check_b1(value: object) -> float:
    b1 = _check_beta("b1", value)
    if b1 <= 0.0:
        raise ValueError(
            f"b1 must be in (0, 1) for schedule-free AdamW, got {value!r} (with b1 = 0 the "
            "averaged iterate x cannot be recovered from y and z)"
        )
    return b1


def scale_by_schedule_free_adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """The whole schedule-free AdamW update as one transform (its learning rate enters the
    averaging weights, so it cannot be a separate ``scale_by_learning_rate``); see
    :func:`schedule_free_adamw` for the arguments.

    The state is ``{"z", "nu": trees, "count": 0-d int64, "lr_max", "weight_sum": 0-d}``;
    trees are float32 for bfloat16/float16 params and keep the param dtype otherwise.
    """
    sched, lr_const = _lr_source(learning_rate)
    b1 = _check_b1(b1)
    b2 = _check_beta("b2", b2)
    eps = _positive("eps", eps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    r = _check_real("r", r)
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r!r}")
    weight_lr_power = _check_real("weight_lr_power", weight_lr_power)
    if weight_lr_power < 0:
        raise ValueError(f"weight_lr_power must be >= 0, got {weight_lr_power!r}")
    decay = add_decayed_weights(weight_decay, mask)

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("schedule_free_adamw", params)
        sdtype = _scalar_dtype(params)
        count = _new_count(params)
        return TensorDict(
            {
                "z": params.apply(lambda p: p.detach().to(_moment_dtype(p.dtype), copy=True)),
                "nu": params.apply(lambda p: torch.zeros_like(p, dtype=_moment_dtype(p.dtype))),
                "count": count,
                "lr_max": torch.zeros((), dtype=sdtype, device=count.device),
                _MARKER: torch.zeros((), dtype=sdtype, device=count.device),
            },
            batch_size=[],
        )

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        if params is None:
            raise ValueError(
                "schedule_free_adamw needs params: call update(updates, state, params)"
            )
        us = T.leaves(updates)
        zs, nu = T.leaves(state["z"]), T.leaves(state["nu"])
        _check_structure(updates, us, len(zs), "schedule_free_adamw")
        ys = T.leaves(params)
        if len(ys) != len(us):
            T.assert_same_structure(params, updates, "params and updates")
        count, lr_max, weight_sum = state["count"], state["lr_max"], state[_MARKER]
        if not us:
            count.add_(1)
            return updates, state
        sdtype = lr_max.dtype

        # Scalars of this step, all 0-d tensors on the device.
        k1 = (count + 1).to(sdtype)
        lr = _lr_tensor(sched, lr_const, count, lr_max)
        if warmup_steps > 0:
            lr = lr * torch.clamp(k1 / warmup_steps, max=1.0)
        lr = lr * torch.sqrt(1.0 - torch.pow(b2, k1))
        lr_max.copy_(torch.maximum(lr_max, lr))
        weight = torch.pow(k1, r) * torch.pow(lr_max, weight_lr_power)
        weight_sum.add_(weight)
        positive = weight_sum > 0
        ckp1 = torch.where(positive, weight / torch.where(positive, weight_sum, 1.0), 0.0)
        count.add_(1)

        same = all(u.dtype == z.dtype for u, z in zip(us, zs, strict=True))
        gs = us if same else [u.to(z.dtype) for u, z in zip(us, zs, strict=True)]

        # u = g / (sqrt(v) + eps) + wd * mask * y, in the state dtype.
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, gs, gs, value=1.0 - b2)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_add_(denom, eps)
        if same:
            torch._foreach_div_(us, denom)
            u_tree = updates
        else:
            quotients = torch._foreach_div(gs, denom)
            u_tree = T.unflatten(dict(zip(T.leaf_keys(updates), quotients, strict=True)))
        del denom
        u_tree, _ = decay.update(u_tree, empty_state(), params)
        u = T.leaves(u_tree)

        # Delta y = c (z_k - y_k) + lr (b1 (1 - c) - 1) u ; then z -= lr u.
        ys_z = (
            ys
            if all(y.dtype == z.dtype for y, z in zip(ys, zs, strict=True))
            else [y.to(z.dtype) for y, z in zip(ys, zs, strict=True)]
        )
        dy = torch._foreach_sub(zs, ys_z)
        torch._foreach_mul_(dy, ckp1)
        torch._foreach_sub_(zs, torch._foreach_mul(u, lr))
        torch._foreach_mul_(u, lr * (b1 * (1.0 - ckp1) - 1.0))
        torch._foreach_add_(u, dy)
        if not same:
            torch._foreach_copy_(us, u)
        return updates, state

    return GradientTransformation(init, update)


def schedule_free_adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024).

    Use a *constant* learning rate (the built-in linear ``warmup_steps`` is the only schedule
    the method wants; a schedule is accepted and multiplies it). The training params are the
    interpolation ``y``; evaluate and export ``schedule_free_eval_params(params, opt_state,
    b1)``. Weight decay is taken at ``y`` and applied to ``z``, as in the reference.

    Args:
        learning_rate: the (peak) learning rate, float or schedule ``step -> lr``.
        b1: interpolation between ``x`` and ``z`` for ``y`` (the "momentum"), in (0, 1).
        b2: decay rate of the second moment.
        eps: denominator epsilon (> 0).
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        warmup_steps: linear warmup length (``lr * (k + 1) / warmup_steps``); 0 disables it.
        r: polynomial weighting power of the average (``(k + 1)^r``).
        weight_lr_power: the averaging weights are ``lr_max^weight_lr_power``.
        mask: which leaves decay: :func:`~tscale.optim.transforms.default_decay_mask`, ``None``
            for all, or ``(name, tensor) -> bool``.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return chain(  # a chain of one: a clip in front joins it (one state layout)
        scale_by_schedule_free_adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            mask=mask,
        )
    )


def _find_schedule_free_state(opt_state: TensorDictBase) -> TensorDictBase:
    found: list[TensorDictBase] = []

    def walk(td: TensorDictBase) -> None:
        keys = set(td.keys())
        if _MARKER in keys and "z" in keys and isinstance(td.get("z"), TensorDictBase):
            found.append(td)
            return
        for k in keys:
            v = td.get(k)
            if isinstance(v, TensorDictBase):
                walk(v)

    walk(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"schedule_free_eval_params: expected one schedule-free AdamW state in opt_state, "
            f"found {len(found)} (was opt_state built by schedule_free_adamw(...).init?)"
        )
    return found[0]


def schedule_free_eval_params(
    params: TensorDictBase, opt_state: TensorDictBase, b1: float = 0.9
) -> TensorDict:
    """The averaged iterate ``x = (y - (1 - b1) z) / b1``: the params to evaluate and export.

    Pure: returns a new tree (param dtypes, same structure, no aliasing) and leaves ``params``
    (the training iterate ``y``) and ``opt_state`` untouched. ``b1`` must be the optimizer's.

    Raises:
        ValueError: ``b1`` outside (0, 1), or ``opt_state`` holds no (or several)
            schedule-free states.
    """
    b1 = _check_b1(b1)
    state = _find_schedule_free_state(opt_state)
    z = state["z"]
    T.assert_same_structure(params, z, "params and the schedule-free z")
    # x = y + (1 - 1/b1)(z - y), as the reference's eval() computes it.
    return params.apply(lambda y, zz: torch.lerp(y.to(zz.dtype), zz, 1.0 - 1.0 / b1).to(y.dtype), z)


@record
class ScheduleFreeAdamWConfig(OptimizerRecord):
    """Schedule-free AdamW (Defazio et al. 2024); takes
    ``scheduler.type: constant`` (its ``warmup_steps`` become the optimizer's own warmup) and is
    evaluated at its averaged iterate."""

    capabilities = Capabilities(eval_params=True, replaces_schedule=True)
    factory = staticmethod(schedule_free_adamw)
    type: Literal["schedule_free_adamw"] = field(
        "schedule_free_adamw", "Schedule-free AdamW (tscale.optim.schedule_free)."
    )
    betas: tuple[float, float] = field(
        (0.9, 0.999), "[b1, b2]: interpolation of the iterates, second-moment decay.", ge=0, lt=1
    )
    eps: float = field(1e-8, "Denominator epsilon.", gt=0)

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return schedule_free_adamw(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            warmup_steps=warmup_steps,
            mask=mask,
        )

    def params_to_evaluate(
        self, params: TensorDictBase, opt_state: TensorDictBase
    ) -> TensorDictBase:
        """The averaged iterate ``x`` (training runs on ``y``)."""
        return schedule_free_eval_params(params, opt_state, self.betas[0])
