"""Prodigy: Adam whose step size ``d`` is estimated on the fly (parameter-free learning rate).

Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner" (ICML 2024,
arXiv:2306.06101), the Adam version of the algorithm. With ``gamma_k`` the learning rate (a
multiplier, 1.0 by default), ``d_k`` the current estimate and ``beta3 = sqrt(b2)``::

    m_{k+1} = b1 m_k + (1 - b1) d_k g_k
    v_{k+1} = b2 v_k + (1 - b2) d_k^2 g_k^2
    r_{k+1} = beta3 r_k + (1 - beta3) gamma_k d_k^2 <g_k, x_0 - x_k>
    s_{k+1} = beta3 s_k + (1 - beta3) gamma_k d_k^2 g_k
    d_{k+1} = max(d_k, d_coef * r_{k+1} / ||s_{k+1}||_1)
    x_{k+1} = x_k - gamma_k d_k (m_{k+1} / (sqrt(v_{k+1}) + d_{k+1} eps) + wd * x_k)

Details follow the authors' reference implementation (``prodigyopt``, ``ProdigyReference``): ``r``
and ``s`` carry ``d_k^2 gamma_k / d0`` instead of ``(1 - beta3) gamma_k d_k^2`` (the ratio is the
same, the values stay away from underflow), the epsilon uses the new estimate, a step with
``gamma_k == 0`` (the first step of a warmup) or with ``s == 0`` (no gradient seen yet) changes
nothing, ``safeguard_warmup`` drops ``gamma_k`` from ``s``, and the decay is decoupled (AdamW
style, scaled by ``gamma_k d_k``). Not implemented: bias correction, ``growth_rate``,
``slice_p``.

``d``, ``r`` and the step count live in the state as 0-d tensors; the scalar logic runs with
``torch.where`` on the device, so an update never waits for the device.
"""

from __future__ import annotations

import math
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
    _check_structure,
    _lr_source,
    _lr_tensor,
    _moment_dtype,
    _new_count,
    _positive,
    _scalar_dtype,
    _zeros_like_moments,
    add_decayed_weights,
    default_decay_mask,
)

__all__ = ["ProdigyConfig", "prodigy", "scale_by_prodigy"]


def scale_by_prodigy(
    learning_rate: float | Schedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    safeguard_warmup: bool = False,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """The whole Prodigy update as one transform (its learning rate enters the ``d`` estimate, so
    it cannot be a separate ``scale_by_learning_rate``); see :func:`prodigy` for the arguments.

    The state is ``{"mu", "nu", "s", "x0": trees, "d", "r": 0-d, "count": 0-d int64}``; trees
    are float32 for bfloat16/float16 params and keep the param dtype otherwise; ``d``/``r`` are
    float64 if any param is. Returned updates keep the dtype of the incoming updates.
    """
    sched, lr_const = _lr_source(learning_rate)
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)
    b3 = math.sqrt(b2) if beta3 is None else _check_beta("beta3", beta3)
    eps = _positive("eps", eps)
    d0 = _positive("d0", d0)
    d_coef = _positive("d_coef", d_coef)
    if not isinstance(safeguard_warmup, bool):
        raise ValueError(f"safeguard_warmup must be a bool, got {safeguard_warmup!r}")
    decay = add_decayed_weights(weight_decay, mask)

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("prodigy", params)
        sdtype = _scalar_dtype(params)
        dev = _new_count(params).device
        return TensorDict(
            {
                "mu": _zeros_like_moments(params),
                "nu": _zeros_like_moments(params),
                "s": _zeros_like_moments(params),
                "x0": params.apply(lambda p: p.detach().to(_moment_dtype(p.dtype), copy=True)),
                "d": torch.full((), d0, dtype=sdtype, device=dev),
                "r": torch.zeros((), dtype=sdtype, device=dev),
                "count": _new_count(params),
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
            raise ValueError("prodigy needs params: call update(updates, state, params)")
        us = T.leaves(updates)
        mu, nu, s, x0 = (T.leaves(state[k]) for k in ("mu", "nu", "s", "x0"))
        _check_structure(updates, us, len(mu), "prodigy")
        ps = T.leaves(params)
        if len(ps) != len(us):
            T.assert_same_structure(params, updates, "params and updates")
        count, d, r = state["count"], state["d"], state["r"]
        if not us:
            count.add_(1)
            return updates, state
        sdtype = d.dtype
        # A fill, not a host-to-device copy of a Python float (which would wait on CUDA).
        lr = _lr_tensor(sched, lr_const, count, d)
        count.add_(1)

        same = all(u.dtype == m.dtype for u, m in zip(us, mu, strict=True))
        gs = us if same else [u.to(m.dtype) for u, m in zip(us, mu, strict=True)]
        xs = (
            ps
            if all(p.dtype == m.dtype for p, m in zip(ps, mu, strict=True))
            else [p.to(m.dtype) for p, m in zip(ps, mu, strict=True)]
        )

        # A step with lr == 0 changes nothing (as the reference, which skips such steps).
        active = lr > 0
        a = active.to(sdtype)
        dlr = d * lr

        # <g, x0 - x> over all leaves, before the moments overwrite anything.
        diff = torch._foreach_sub(x0, xs)
        torch._foreach_mul_(diff, gs)
        dot = torch.stack([t.sum(dtype=sdtype) for t in diff]).sum()
        del diff

        # m = b1 m + (1 - b1) d g ; v = b2 v + (1 - b2) d^2 g^2 ; s = b3 s + c_s g (gated by a).
        torch._foreach_mul_(mu, 1.0 + a * (b1 - 1.0))
        torch._foreach_add_(mu, torch._foreach_mul(gs, a * ((1.0 - b1) * d)))
        torch._foreach_mul_(nu, 1.0 + a * (b2 - 1.0))
        torch._foreach_addcmul_(nu, torch._foreach_mul(gs, a * ((1.0 - b2) * d * d)), gs)
        c_s = (d / d0) * (d if safeguard_warmup else dlr)
        torch._foreach_mul_(s, 1.0 + a * (b3 - 1.0))
        torch._foreach_add_(s, torch._foreach_mul(gs, a * c_s))

        s_norm = torch.stack([n.to(sdtype) for n in torch._foreach_norm(s, 1)]).sum()
        ok = active & (s_norm > 0)
        r_new = b3 * r + (d / d0) * dlr * dot
        d_hat = d_coef * r_new / torch.where(ok, s_norm, torch.ones_like(s_norm))
        d_new = torch.where(ok, torch.maximum(d, d_hat), d)
        r.copy_(torch.where(ok, r_new, r))

        # update = -(d_k lr) * ok * (m / (sqrt(v) + d_{k+1} eps) + wd * mask * x)
        # sqrt(v) + d eps as d (sqrt(v) / d + eps): the foreach add of a 0-d tensor reads it on
        # the host (CPU kernels), a foreach mul/div by one does not.
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, d_new)
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, d_new)
        if same:
            torch._foreach_copy_(us, mu)
            torch._foreach_div_(us, denom)
        else:
            torch._foreach_copy_(us, torch._foreach_div(mu, denom))
        del denom
        updates, _ = decay.update(updates, empty_state(), params)
        torch._foreach_mul_(us, torch.neg(dlr * ok.to(sdtype)))
        d.copy_(d_new)
        return updates, state

    return GradientTransformation(init, update)


def prodigy(
    learning_rate: float | Schedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    safeguard_warmup: bool = False,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", ICML 2024): Adam with a step size ``d`` estimated from the distance travelled.

    Leave ``learning_rate`` at 1.0 (it multiplies ``d``) and combine it with a schedule such as
    cosine decay; tune ``d_coef`` to force a smaller or larger estimate. With a warmup schedule,
    consider ``safeguard_warmup=True`` (the small early rates otherwise inflate ``d``). The
    current estimate is ``opt_state[...]["d"]`` (a 0-d tensor), e.g. to log it.

    Args:
        learning_rate: a multiplier of the estimated step size, float or schedule ``step -> lr``.
        b1, b2: Adam's moment decay rates.
        beta3: decay rate of the ``d`` statistics; ``None`` means ``sqrt(b2)``.
        eps: denominator epsilon (scaled by ``d``); > 0.
        weight_decay: decoupled decay coefficient (multiplied by ``d * learning_rate``).
        d0: initial estimate of ``d`` (> 0).
        d_coef: multiplier of the estimate (> 0).
        safeguard_warmup: leave the learning rate out of ``s`` (for warmup schedules).
        mask: which leaves decay: :func:`~tscale.optim.transforms.default_decay_mask`, ``None``
            for all, or ``(name, tensor) -> bool``.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return chain(  # a chain of one: a clip in front joins it (one state layout)
        scale_by_prodigy(
            learning_rate,
            b1=b1,
            b2=b2,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            d0=d0,
            d_coef=d_coef,
            safeguard_warmup=safeguard_warmup,
            mask=mask,
        )
    )


@record
class ProdigyConfig(OptimizerRecord):
    """Adam with an estimated step size (Mishchenko & Defazio
    2023); leave ``lr`` at 1.0 (a factor on the estimate) and tune ``d_coef``."""

    capabilities = Capabilities(elementwise=False)  # d comes from sums over all params
    factory = staticmethod(prodigy)
    type: Literal["prodigy"] = field("prodigy", "Prodigy (tscale.optim.prodigy).")
    betas: tuple[float, float] = field((0.9, 0.999), "Moment decay rates [b1, b2].", ge=0, lt=1)
    eps: float = field(1e-8, "Denominator epsilon (scaled by the estimate d).", gt=0)
    d0: float = field(1e-6, "Initial step-size estimate.", gt=0)
    d_coef: float = field(1.0, "Factor on the estimated step size.", gt=0)
    safeguard_warmup: bool = field(
        False, "Keep the lr out of the step-size estimate (use with warmup)."
    )

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return prodigy(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            d0=self.d0,
            d_coef=self.d_coef,
            safeguard_warmup=self.safeguard_warmup,
            mask=mask,
        )
