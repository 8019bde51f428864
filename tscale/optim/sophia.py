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
an optimizer cannot compute: the step computes it and hands it over *through the state*.
:func:`with_hessian_estimate` returns a shallow copy of the optimizer state whose Sophia
sub-state carries a transient slot ``hessian_estimate`` (a tree like the params, or an empty tree
when the step skipped the estimator). ``update`` folds it into the EMA on the steps where the
state's ``hessian_due`` flag (``count % update_every == 0``, on the device) is set, and passes
the slot through, so a wrapper that compares the state before and after an update (such as
``skip_nonfinite``) sees one structure; the step then drops it with
:func:`without_hessian_estimate`, so the stored state (and checkpoints) keep the structure of
``init``. :func:`tscale.step.sophia.make_sophia_train_step` does all of this. An update without
the slot (e.g. from the plain ``make_train_step``) raises: silently running with ``h = 0`` would
turn Sophia into sign descent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.optim.base import GradientTransformation
from tscale.optim.lion import _check_float_params
from tscale.optim.prodigy import _positive
from tscale.optim.transforms import (
    MaskFn,
    NormFn,
    Schedule,
    _check_beta,
    _check_structure,
    _moment_dtype,
    _new_count,
    clip_then,
    decayed_and_scaled,
    default_decay_mask,
)

__all__ = [
    "HESSIAN_ESTIMATE",
    "hessian_due",
    "scale_by_sophia",
    "sophia_g",
    "with_hessian_estimate",
    "without_hessian_estimate",
]

HESSIAN_ESTIMATE = "hessian_estimate"
"""Transient state slot: the estimate ``hhat`` (a tree like the params) for this update."""
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
    :func:`hessian_due`). Each ``update`` needs the slot of :func:`with_hessian_estimate`.
    Returned updates keep the dtype of the incoming updates.

    Raises:
        ValueError: ``b1``/``b2`` outside [0, 1), ``rho``/``eps`` not > 0, ``update_every``
            not an int >= 1; at update time, a state without the ``hessian_estimate`` slot.
    """
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)
    rho = _positive("rho", rho)
    eps = _positive("eps", eps)
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_sophia", params)

        def zeros(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(p, dtype=_moment_dtype(p.dtype))

        count = _new_count(params)
        return TensorDict(
            {
                "mu": params.apply(zeros),
                "hessian": params.apply(zeros),
                "count": count,
                _DUE: torch.ones((), dtype=torch.bool, device=count.device),
            },
            batch_size=[],
        )

    def update(
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None = None
    ) -> tuple[TensorDictBase, TensorDictBase]:
        if HESSIAN_ESTIMATE not in state:
            raise ValueError(
                "sophia needs a Hessian estimate with every update: build the step with "
                "tscale.step.sophia.make_sophia_train_step, or pass the state through "
                "tscale.optim.sophia.with_hessian_estimate(opt_state, estimate)"
            )
        us = T.leaves(updates)
        mu, hs = T.leaves(state["mu"]), T.leaves(state["hessian"])
        _check_structure(updates, us, len(mu), "scale_by_sophia")
        count, due, estimate = state["count"], state[_DUE], state[HESSIAN_ESTIMATE]
        new_state = TensorDict(
            {k: state[k] for k in ("mu", "hessian", "count", _DUE, HESSIAN_ESTIMATE)},
            batch_size=[],
        )
        es = T.leaves(estimate)
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
            return updates, new_state

        same = all(u.dtype == m.dtype for u, m in zip(us, mu, strict=True))
        gs = us if same else [u.to(m.dtype) for u, m in zip(us, mu, strict=True)]
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
        return updates, new_state

    return GradientTransformation(init, update)


def _rebuild(
    opt_state: TensorDictBase, edit: Callable[[dict[str, Any]], None], what: str
) -> TensorDict:
    """A shallow copy of ``opt_state`` with ``edit(d)`` applied to the dict of each Sophia
    sub-state (exactly one must exist)."""
    found = 0

    def walk(td: TensorDictBase) -> TensorDict:
        nonlocal found
        items = {k: td.get(k) for k in td.keys()}  # noqa: SIM118 (keys, not leaves)
        if _is_sophia_state(td):
            found += 1
            edit(items)
        else:
            items = {k: walk(v) if isinstance(v, TensorDictBase) else v for k, v in items.items()}
        return TensorDict(items, batch_size=[])

    new = walk(opt_state)
    if found != 1:
        raise ValueError(
            f"{what}: opt_state must hold exactly one Sophia state (keys 'mu', 'hessian', "
            f"'hessian_due'), found {found}; was it built by sophia_g(...).init?"
        )
    return new


def with_hessian_estimate(opt_state: TensorDictBase, estimate: TensorDictBase | None) -> TensorDict:
    """A shallow copy of ``opt_state`` whose Sophia sub-state carries ``estimate`` for the next
    ``update`` (no tensor is copied; ``opt_state`` is not modified). The update consumes the
    estimate's storage.

    Args:
        opt_state: a state built by an optimizer containing :func:`scale_by_sophia`.
        estimate: the Hessian diagonal estimate, a tree like the params; ``None`` when the step
            skipped the estimator, which it may do only when :func:`hessian_due` is False.

    Raises:
        ValueError: ``opt_state`` holds no Sophia state, or several.
    """
    slot = estimate if estimate is not None else TensorDict({}, batch_size=[])

    def edit(items: dict) -> None:
        items[HESSIAN_ESTIMATE] = slot

    return _rebuild(opt_state, edit, "with_hessian_estimate")


def without_hessian_estimate(opt_state: TensorDictBase) -> TensorDict:
    """A shallow copy of ``opt_state`` without the transient estimate slot (the structure of
    ``init``, as stored and checkpointed).

    Raises:
        ValueError: ``opt_state`` holds no Sophia state, or several.
    """

    def edit(items: dict) -> None:
        items.pop(HESSIAN_ESTIMATE, None)

    return _rebuild(opt_state, edit, "without_hessian_estimate")


def hessian_due(opt_state: TensorDictBase) -> torch.Tensor:
    """0-d bool on the device: the next update folds its estimate into the Hessian EMA.

    Raises:
        ValueError: ``opt_state`` holds no Sophia state, or several.
    """
    flags: list[torch.Tensor] = []
    _rebuild(opt_state, lambda items: flags.append(items[_DUE]), "hessian_due")
    return flags[0]


def sophia_g(
    learning_rate: float | Schedule,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    weight_decay: float = 0.1,
    update_every: int = 10,
    mask: MaskFn | None = default_decay_mask,
    max_grad_norm: float | None = None,
    norm_fn: NormFn | None = None,
) -> GradientTransformation:
    """Sophia-G (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024), with the Gauss-Newton-Bartlett Hessian estimator.

    ``chain(clip_by_global_norm?, scale_by_sophia, add_decayed_weights, scale_by_learning_rate)``.
    Train it with :func:`tscale.step.sophia.make_sophia_train_step`, which computes the
    estimate and passes it in; the plain ``make_train_step`` is refused (see the module
    docstring). The paper's GPT-2 settings:
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
        max_grad_norm: clip gradients to this global L2 norm first; ``None`` disables clipping.
        norm_fn: the global-norm function of the clip (FSDP: summed across shards; see
            :func:`~tscale.optim.transforms.clip_by_global_norm`).

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return clip_then(
        max_grad_norm,
        *decayed_and_scaled(
            scale_by_sophia(b1=b1, b2=b2, rho=rho, eps=eps, update_every=update_every),
            learning_rate,
            weight_decay,
            mask,
        ),
        norm_fn=norm_fn,
    )
