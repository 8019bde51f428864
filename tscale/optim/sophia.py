"""Sophia-G: clipped, diagonally preconditioned momentum with a Gauss-Newton-Bartlett Hessian.

Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (ICLR 2024, arXiv:2305.14342), Algorithm 3, at step ``t = 0, 1, ...``::

    m_t = b1 m_{t-1} + (1 - b1) g_t
    h_t = b2 h_{t-k} + (1 - b2) hhat_t      if t mod k == 0   (else h_t = h_{t-1})
    theta_{t+1} = theta_t - lr_t (clip(m_t / max(rho h_t, eps), 1) + wd theta_t)

with ``clip(z, 1) = max(min(z, 1), -1)`` elementwise, ``k = update_every`` and ``hhat`` the
Gauss-Newton-Bartlett estimate (Algorithm 2): ``B * ghat * ghat``, ``ghat`` the gradient of the
mean loss over ``B`` tokens whose labels are *sampled* from the model's own softmax. (The paper
counts ``t`` from 1 and estimates when ``t mod k == 1``: the same steps.) Every element moves by
at most ``lr`` (plus decay).

**How the estimate reaches the transform.** ``hhat`` needs a second gradient of the model, which
an optimizer cannot compute: the step computes it and passes it as an optax-style extra argument,
``tx.update(grads, opt_state, params, hessian=hhat)`` (``hhat`` a tree like the params, or
``None`` when the step skipped the estimator on a step that is not due). ``update`` folds it into
the EMA on the steps where the state's ``hessian_due`` flag (``count % update_every == 0``, on the
device) is set. :func:`tscale.step.sophia.make_hessian_estimate` computes it for
:func:`tscale.step.make_train_step`'s ``update_extra`` hook. An update without the argument
raises: silently running with ``h = 0`` would turn Sophia into sign descent.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.core.fields import field
from tscale.optim.base import GradientTransformation
from tscale.optim.record import Capabilities, OptimizerRecord, record
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    _check_beta,
    _check_float_params,
    _check_int,
    _check_structure,
    _new_count,
    _open_update,
    _positive,
    _zeros_like_moments,
    decoupled,
    default_decay_mask,
)

__all__ = ["SophiaGConfig", "hessian_due", "scale_by_sophia", "sophia_g"]

_DUE = "hessian_due"


def _is_sophia_state(td: TensorDictBase) -> bool:
    keys = set(td.keys())
    return {"mu", "hessian", _DUE} <= keys and isinstance(td.get("hessian"), TensorDictBase)


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    update_every: int = 10,
) -> GradientTransformation:
    """Replace the updates by ``clip(m / max(rho * h, eps), 1)`` (Liu et al., 2023,
    Algorithm 3, without the learning rate and the decay).

    The state is ``{"mu": tree, "hessian": tree, "count": 0-d int64, "hessian_due": 0-d
    bool}`` (trees float32 for bfloat16/float16 params, the param dtype otherwise).
    ``hessian_due`` says whether the next update folds its estimate into the Hessian EMA
    (``count % update_every == 0``); a step that branches on the host reads it (see
    :func:`hessian_due`). Each ``update`` takes the estimate as the keyword argument
    ``hessian``. Returned updates keep the dtype of the incoming updates.

    Raises:
        ValueError: ``b1``/``b2`` outside [0, 1), ``rho``/``eps`` not > 0, ``update_every``
            not an int >= 1; at update time, no ``hessian`` argument.
    """
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)
    rho = _positive("rho", rho)
    eps = _positive("eps", eps)
    update_every = _check_int("update_every", update_every, 1)

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_sophia", params)
        count = _new_count(params)
        return TensorDict(
            {
                "mu": _zeros_like_moments(params),
                "hessian": _zeros_like_moments(params),
                "count": count,
                _DUE: torch.ones((), dtype=torch.bool, device=count.device),
            },
            batch_size=[],
        )

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        if "hessian" not in extra:
            raise ValueError(
                "sophia needs a Hessian estimate with every update: "
                "tx.update(grads, opt_state, params, hessian=estimate), e.g. from "
                "make_train_step(..., update_extra=tscale.step.sophia.make_hessian_estimate(...))"
            )
        estimate: TensorDictBase | None = extra["hessian"]
        mu, hs = T.leaves(state["mu"]), T.leaves(state["hessian"])
        us, gs, same = _open_update(updates, mu, "scale_by_sophia")
        count, due = state["count"], state[_DUE]
        es = T.leaves(estimate) if estimate is not None else []
        if us and es:
            _check_structure(estimate, es, len(hs), "scale_by_sophia (hessian_estimate)")
            # The estimate is consumed (as the updates are): reuse its storage when it can.
            es = [e if e.dtype == h.dtype else e.to(h.dtype) for e, h in zip(es, hs, strict=True)]
            # h += w (hhat - h), w = 1 - b2 on due steps and exactly 0 otherwise (a foreach
            # lerp or add with a 0-d tensor weight would read it on the host; mul does not).
            w = due.to(hs[0].dtype) * (1.0 - b2)
            torch._foreach_sub_(es, hs)
            torch._foreach_mul_(es, w)
            torch._foreach_add_(hs, es)
        # else: the step skipped the estimator, which it does only on steps that are not due.
        count.add_(1)
        due.copy_(torch.remainder(count, update_every) == 0)
        if not us:
            return updates, state

        torch._foreach_lerp_(mu, gs, 1.0 - b1)
        denom = torch._foreach_mul(hs, rho)
        torch._foreach_clamp_min_(denom, eps)
        if same:
            torch._foreach_copy_(us, mu)
            torch._foreach_div_(us, denom)
            torch._foreach_clamp_min_(us, -1.0)
            torch._foreach_clamp_max_(us, 1.0)
        else:
            out = torch._foreach_div(mu, denom)
            torch._foreach_clamp_min_(out, -1.0)
            torch._foreach_clamp_max_(out, 1.0)
            torch._foreach_copy_(us, out)
        return updates, state

    return GradientTransformation(init, update)


def hessian_due(opt_state: TensorDictBase) -> torch.Tensor:
    """0-d bool on the device: the next update folds its estimate into the Hessian EMA.

    Raises:
        ValueError: ``opt_state`` holds no Sophia state, or several.
    """
    found: list[torch.Tensor] = []

    def walk(td: TensorDictBase) -> None:
        if _is_sophia_state(td):
            found.append(td[_DUE])
            return
        for key in td.keys():  # noqa: SIM118 (keys, not leaves)
            sub = td.get(key)
            if isinstance(sub, TensorDictBase):
                walk(sub)

    walk(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"hessian_due: opt_state must hold exactly one Sophia state (keys 'mu', 'hessian', "
            f"'hessian_due'), found {len(found)}; was it built by sophia_g(...).init?"
        )
    return found[0]


def sophia_g(
    learning_rate: float | Schedule,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    weight_decay: float = 0.1,
    update_every: int = 10,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """Sophia-G (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024), with the Gauss-Newton-Bartlett Hessian estimator.

    ``chain(scale_by_sophia, add_decayed_weights, scale_by_learning_rate)``. Train it with
    ``make_train_step(..., update_extra=make_hessian_estimate(apply_fn))``
    (:mod:`tscale.step.sophia`), which computes the estimate and passes it to ``update``; without
    it the update is refused (see the module docstring). The paper's GPT-2 settings:
    ``b1=0.965, b2=0.99, rho=0.04, weight_decay=0.2`` and a learning rate near AdamW's.

    Args:
        learning_rate: a float or a schedule ``step -> lr``.
        b1: momentum decay rate.
        b2: decay rate of the Hessian EMA (per estimate, not per step).
        rho: ``gamma`` of the paper: scales the Hessian in the denominator (> 0).
        eps: floor of the denominator (> 0).
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        update_every: steps between Hessian estimates (the paper's ``k``), counted in applied
            updates; the first update uses one.
        mask: which leaves decay: :func:`~tscale.optim.transforms.default_decay_mask`, ``None``
            for all, or ``(name, tensor) -> bool``.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return decoupled(
        scale_by_sophia(b1=b1, b2=b2, rho=rho, eps=eps, update_every=update_every),
        learning_rate,
        weight_decay,
        mask,
    )


@record
class SophiaGConfig(OptimizerRecord):
    """Clipped diagonal Gauss-Newton preconditioning (Liu et al.
    2023); the step computes its Hessian estimate every ``update_every`` steps."""

    capabilities = Capabilities(needs_objective=True)
    factory = staticmethod(sophia_g)
    type: Literal["sophia_g"] = field("sophia_g", "Sophia-G (tscale.optim.sophia).")
    betas: tuple[float, float] = field(
        (0.965, 0.99), "[b1, b2]: momentum decay, Hessian EMA decay (per estimate).", ge=0, lt=1
    )
    eps: float = field(1e-15, "Floor of the denominator.", gt=0)
    rho: float = field(0.04, "Scale of the Hessian in the denominator (the paper's gamma).", gt=0)
    update_every: int = field(10, "Steps between Hessian estimates (the paper's k).", ge=1)

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return sophia_g(
            learning_rate,
            b1=b1,
            b2=b2,
            rho=self.rho,
            eps=self.eps,
            weight_decay=self.weight_decay,
            update_every=self.update_every,
            mask=mask,
        )
