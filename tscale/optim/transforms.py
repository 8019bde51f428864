"""Gradient transformations: the building blocks that :func:`tscale.optim.chain` composes.

Every factory validates its hyper-parameters eagerly (a :class:`ValueError` naming the argument)
and returns a :class:`~tscale.optim.base.GradientTransformation`. Inner loops run
``torch._foreach_*_`` in place over the leaf lists of the trees (``tree.leaves``): trees built from
the same params share key order, so the lists line up index by index. No transform reads a tensor
on the host (no ``.item()``, no ``float(t)``, no Python branch on a tensor), so an update never
waits for the device.

Ownership follows :mod:`tscale.optim.base`: ``update`` modifies ``updates`` and its own state in
place and returns them; it never modifies ``params``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.optim.base import GradientTransformation, Schedule, chain, empty_state
from tscale.optim.base import check_real as _check_real

MaskFn = Callable[[str, torch.Tensor], bool]
"""``mask(name, tensor) -> bool``: True where weight decay applies (``name`` is dotted)."""

NormFn = Callable[[list[torch.Tensor]], torch.Tensor]
"""``norm_fn(leaves) -> 0-d tensor``: the global L2 norm of a list of leaves."""

__all__ = [
    "MaskFn",
    "Schedule",
    "add_decayed_weights",
    "clip_by_global_norm",
    "decoupled",
    "default_decay_mask",
    "no_decay_mask",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "skip_nonfinite",
    "skipped_steps",
]


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_beta(name: str, value: object) -> float:
    v = _check_real(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def _positive(name: str, value: object) -> float:
    v = _check_real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_structure(updates: TensorDictBase, us: list[torch.Tensor], n: int, what: str) -> None:
    """Cheap leaf-count check; the precise message comes from ``assert_same_structure``."""
    if len(us) != n:
        raise ValueError(
            f"{what}: updates have {len(us)} leaves but the state was built for {n} "
            f"(was init() called on other params?); update leaves: {T.leaf_keys(updates)[:5]} ..."
        )


def _check_float_params(who: str, params: TensorDictBase) -> None:
    """The opening of every stateful ``init``: optimizers take floating-point trees."""
    for name, p in zip(T.leaf_keys(params), T.leaves(params), strict=True):
        if not p.is_floating_point():
            raise ValueError(
                f"{who}: params leaf {name!r} has dtype {p.dtype}; optimizers take "
                "floating-point trees (split others off with tscale.core.tree.partition)"
            )


def _zeros_like_moments(params: TensorDictBase) -> TensorDictBase:
    """Zeros shaped like ``params`` in the moment dtype (:func:`_moment_dtype`)."""
    return params.apply(lambda p: torch.zeros_like(p, dtype=_moment_dtype(p.dtype)))


def _open_update(
    updates: TensorDictBase, moments: list[torch.Tensor], who: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """The opening of every elementwise ``update``: ``(us, gs, same)`` with ``us`` the update
    leaves (checked against the state's ``moments``), ``gs`` the gradients in the moments'
    dtypes (``us`` itself when ``same``, so they may be overwritten: ownership) ."""
    us = T.leaves(updates)
    _check_structure(updates, us, len(moments), who)
    same = all(u.dtype == m.dtype for u, m in zip(us, moments, strict=True))
    gs = us if same else [u.to(m.dtype) for u, m in zip(us, moments, strict=True)]
    return us, gs, same


def _count_device(params: TensorDictBase) -> torch.device:
    ps = T.leaves(params)
    return ps[0].device if ps else torch.device("cpu")


def _new_count(params: TensorDictBase) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_count_device(params))


def _scalar_dtype(params: TensorDictBase) -> torch.dtype:
    return (
        torch.float64 if any(p.dtype == torch.float64 for p in T.leaves(params)) else torch.float32
    )


def _lr_source(learning_rate: float | Schedule) -> tuple[Schedule | None, float]:
    """``(schedule, 0.0)`` or ``(None, lr)`` for a transform that reads its learning rate inside
    its update (Prodigy, schedule-free), with :func:`_lr_tensor`.

    Raises:
        ValueError: a float ``learning_rate`` that is negative or not finite.
    """
    if callable(learning_rate):
        return learning_rate, 0.0
    lr = _check_real("learning_rate", learning_rate)
    if lr < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate!r}")
    return None, lr


def _lr_tensor(
    sched: Schedule | None, lr_const: float, count: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """The learning rate at ``count`` as a 0-d tensor like ``like``, built on the device (a fill,
    not a host-to-device copy of a Python float, which would wait for CUDA)."""
    lr = sched(count) if sched is not None else lr_const
    if isinstance(lr, torch.Tensor):
        return lr.to(like.dtype)
    return torch.full_like(like, float(lr))


# --------------------------------------------------------------------------------------------
# scaling


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by a constant ``factor`` (stateless).

    Raises:
        ValueError: ``factor`` is not a finite real number.
    """
    factor = _check_real("factor", factor)

    def init(params: TensorDictBase) -> TensorDict:
        return empty_state()

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        us = T.leaves(updates)
        if us and factor != 1.0:
            torch._foreach_mul_(us, factor)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)``; ``count`` (0-d int64) starts at 0.

    The schedule is called with the on-device ``count`` tensor, so it must accept a 0-d tensor and
    return a 0-d tensor (every schedule in :mod:`tscale.optim.schedules` does) — no host sync.

    Raises:
        ValueError: ``schedule`` is not callable.
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be callable (step -> lr), got {schedule!r}")

    def init(params: TensorDictBase) -> TensorDict:
        return TensorDict({"count": _new_count(params)}, batch_size=[])

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        count = state["count"]
        us = T.leaves(updates)
        if us:
            factor = schedule(count)
            if not isinstance(factor, torch.Tensor):
                factor = torch.as_tensor(factor, dtype=torch.float32, device=count.device)
            torch._foreach_mul_(us, factor)
        count.add_(1)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """Scale by ``-learning_rate`` (a float or a schedule): updates are added to params.

    Raises:
        ValueError: a float ``learning_rate`` that is negative or not finite.
    """
    sched, lr = _lr_source(learning_rate)
    if sched is not None:
        return scale_by_schedule(lambda count: torch.neg(sched(count)))
    return scale(-lr)


# --------------------------------------------------------------------------------------------
# clipping


def clip_by_global_norm(
    max_norm: float, *, norm_fn: NormFn | None = None
) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (norm + 1e-6))`` (as ``clip_grad_norm_``).

    The factor stays on the device (``torch._foreach_mul_`` with a 0-d tensor), so clipping never
    waits for the norm. Stateless. ``norm_fn(leaves) -> 0-d norm`` replaces
    :func:`tscale.core.tree.global_norm` where the leaves are shards of the real tree (FSDP: the
    squares are summed across ranks, so every shard is clipped by the norm of the whole).

    Raises:
        ValueError: ``max_norm`` is not a positive finite number.
    """
    max_norm = _check_real("max_norm", max_norm)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def init(params: TensorDictBase) -> TensorDict:
        return empty_state()

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        us = T.leaves(updates)
        if not us:
            return updates, state
        norm = (norm_fn or T.global_norm)(us)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(us, coef)
        return updates, state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# Adam


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Moments keep float32/float64 params' dtype; lower precision ones get float32 moments."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _adam_direction_per_leaf(
    out: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    bc1: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    eps: float,
) -> None:
    """``out = mu / (bc1 * (sqrt(nu) / bc2_sqrt + eps))`` in three passes per leaf (CPU).

    CPU ``_foreach_*`` ops loop over the leaves anyway; the out= forms need no temporaries:
    ``sqrt(nu) * (bc1 / bc2_sqrt) + eps * bc1`` with one ``addcmul``, then ``mu / that``.
    """
    k = bc1 / bc2_sqrt
    e = bc1 * eps
    for o, m, n in zip(out, mu, nu, strict=True):
        torch.sqrt(n, out=o)
        torch.addcmul(e, o, k, out=o)
        torch.div(m, o, out=o)


def _adam_direction_foreach(
    out: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    bc1: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    eps: float,
) -> None:
    """The same as :func:`_adam_direction_per_leaf` with fused multi-tensor kernels (GPUs).

    ``_foreach_add_`` takes ``eps`` as a Python number (with a 0-d tensor it would read it on the
    host), so ``bc1`` is applied by its own multiplication.
    """
    torch._foreach_copy_(out, nu)
    torch._foreach_sqrt_(out)
    torch._foreach_div_(out, bc2_sqrt)
    torch._foreach_add_(out, eps)
    torch._foreach_mul_(out, bc1)
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, mu)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moments: ``m̂ / (sqrt(v̂) + eps)``.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015). The state is
    ``{"mu": tree, "nu": tree, "count": 0-d int64}``; moments are float32 for bfloat16/float16
    params and keep the param dtype for float32/float64. Returned updates keep the dtype of the
    incoming updates. Bias corrections are 0-d tensors computed from ``count`` on the device.

    Raises:
        ValueError: ``b1``/``b2`` outside [0, 1) or ``eps`` negative; at ``init``, a params leaf
            that is not floating point.
    """
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)
    eps = _check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_adam", params)
        return TensorDict(
            {
                "mu": _zeros_like_moments(params),
                "nu": _zeros_like_moments(params),
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
        mu = T.leaves(state["mu"])
        nu = T.leaves(state["nu"])
        # gs: the gradients in the moments' dtype; when the incoming updates already have it
        # they are ours to overwrite (ownership), and they become the output buffer below.
        us, gs, same = _open_update(updates, mu, "scale_by_adam")
        count = state["count"]
        count.add_(1)
        if not us:
            return updates, state

        torch._foreach_lerp_(mu, gs, 1.0 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, gs, gs, value=1.0 - b2)

        # Bias corrections as 0-d tensors on the device: widest moment dtype, no host sync.
        sdtype = torch.float64 if any(m.dtype == torch.float64 for m in mu) else torch.float32
        t = count.to(sdtype)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t))

        # update = (mu / bc1) / (sqrt(nu) / sqrt(bc2) + eps), as torch.optim.Adam computes it,
        # written into the gradient buffers, which are dead once the moments are updated: no
        # tree-sized temporary per step. (On CPU a fresh temporary costs 4 bytes per parameter
        # of page faults every step, as much as several passes over the params.)
        # Fused kernels on GPUs; per leaf on CPU and for tensor subclasses (DTensor has no
        # sharding rule for `_foreach_copy_`).
        if gs[0].device.type == "cpu" or type(gs[0]) is not torch.Tensor:
            _adam_direction_per_leaf(gs, mu, nu, bc1, bc2_sqrt, eps)
        else:
            _adam_direction_foreach(gs, mu, nu, bc1, bc2_sqrt, eps)
        if not same:
            torch._foreach_copy_(us, gs)
        return updates, state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# weight decay


def default_decay_mask(name: str, tensor: torch.Tensor) -> bool:
    """Decay matrices only: no decay for tensors with fewer than 2 dims (norms, biases, scalars)
    nor for token embeddings (names containing ``embed_tokens``)."""
    return tensor.ndim >= 2 and "embed_tokens" not in name


def no_decay_mask(patterns: Sequence[str]) -> MaskFn:
    """A decay mask from name patterns: a leaf decays unless one of the regular expressions
    ``patterns`` matches somewhere in its dotted name (``re.search``); ``[]`` decays every leaf.

    Example: ``no_decay_mask([r"\\.bias$", r"norm", r"embed_tokens"])``.

    Raises:
        ValueError: ``patterns`` is a string or holds something that is not a valid regular
            expression (the message gives its index).
    """
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ValueError(f"patterns must be a list of regular expressions, got {patterns!r}")
    compiled = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ValueError(f"patterns[{i}] must be a string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"patterns[{i}] {pattern!r} is not a valid regex: {err}") from None

    def mask(name: str, tensor: torch.Tensor) -> bool:
        return not any(c.search(name) for c in compiled)

    return mask


def add_decayed_weights(weight_decay: float, mask: MaskFn | None = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay when placed after
    the adaptive scaling and before the learning rate; Loshchilov & Hutter, "Decoupled Weight
    Decay Regularization", ICLR 2019).

    Args:
        weight_decay: the decay coefficient (>= 0; 0 makes the transform a no-op).
        mask: ``None`` decays every leaf; a callable ``mask(name, tensor) -> bool`` (such as
            :func:`default_decay_mask`) selects leaves by dotted name. It is resolved from the
            params at update time and cached by the params' names and shapes.

    Raises:
        ValueError: ``weight_decay`` negative or not finite; ``mask`` neither None nor callable;
            at update time, ``params`` missing.
    """
    weight_decay = _check_real("weight_decay", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if mask is not None and not callable(mask):
        raise ValueError(
            f"mask must be None or a callable (name, tensor) -> bool, got {type(mask).__name__}"
        )
    cache: dict[tuple, list[int]] = {}

    def _selected(params: TensorDictBase, ps: list[torch.Tensor]) -> list[int]:
        if mask is None:
            return list(range(len(ps)))
        names = T.leaf_keys(params)
        key = tuple((n, tuple(p.shape), p.ndim) for n, p in zip(names, ps, strict=True))
        if key not in cache:
            cache.clear()  # one params structure per optimizer: keep only the latest
            cache[key] = [i for i, (n, p) in enumerate(zip(names, ps, strict=True)) if mask(n, p)]
        return cache[key]

    def init(params: TensorDictBase) -> TensorDict:
        # Resolve the mask now: filled while torch.compile traces, the cache would force a
        # second compilation of the step.
        _selected(params, T.leaves(params))
        return empty_state()

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError(
                "add_decayed_weights needs params: call update(updates, state, params)"
            )
        us = T.leaves(updates)
        ps = T.leaves(params)
        if len(us) != len(ps):
            T.assert_same_structure(params, updates, "params and updates")
        idx = _selected(params, ps)
        if idx:
            torch._foreach_add_([us[i] for i in idx], [ps[i] for i in idx], alpha=weight_decay)
        return updates, state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# non-finite updates


def _all_finite(ts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool: every element of every tensor is finite, without a host sync.

    One fused L2-norm pass (the max-norm is several times slower on CPU): a NaN or an inf makes
    a leaf's norm non-finite. So does a finite leaf whose norm overflows its dtype (beyond ~1e19
    per element in float32), a gradient no clipping could rescue either.
    """
    if not ts:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(ts)
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def skip_nonfinite(
    inner: GradientTransformation, *, select_on_device: bool | None = None
) -> GradientTransformation:
    """Run ``inner``, and drop the whole step when a gradient or an update is NaN or inf.

    On such a step the returned updates are all ``-0.0`` (``p + -0.0 == p`` bit for bit, signed
    zeros included) and the state of ``inner`` is the one from before the step, so the params
    stay bit-identical and NaNs never reach the moments. On an accelerator the choice is made
    on the device with ``torch.where`` on a 0-d flag — no host sync — so the cost is paid on
    every step: one norm pass over the gradients and one over the updates, a transient copy of
    ``inner``'s state and a select per state leaf (``benchmarks/optimizers.py`` measures it).
    With plain CPU tensors there is no device to wait for: the flag is read, and a finite step
    (nearly every one) skips the selects (``select_on_device``: True/False force either way;
    None: on the device unless the flag is a plain CPU tensor outside ``torch.compile``). Both
    ways give bit-identical results. A skipped step does not advance ``inner``'s counters (a
    schedule inside it counts the applied steps), as ``optax.apply_if_finite``.

    The state is ``{"inner": inner_state, "skipped": 0-d int64}``; ``skipped`` counts the dropped
    steps — read it with :func:`skipped_steps` (e.g. as a step metric).

    Raises:
        ValueError: ``inner`` is not a :class:`GradientTransformation`.
    """
    if not isinstance(inner, GradientTransformation):
        raise ValueError(
            f"skip_nonfinite wraps a GradientTransformation, got {type(inner).__name__}"
            " (did you pass the factory instead of calling it?)"
        )

    def init(params: TensorDictBase) -> TensorDict:
        return TensorDict({"inner": inner.init(params), "skipped": _new_count(params)}, [])

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        skipped = state["skipped"]
        inner_state = state["inner"]
        finite_in = _all_finite(T.leaves(updates), skipped.device)
        # inner updates its state in place: keep the old values to fall back on
        old = T.leaves(inner_state)
        old = [t.clone() for t in old]
        updates, new_inner = inner.update(updates, inner_state, params, **extra)
        us = T.leaves(updates)
        ok = finite_in & _all_finite(us, skipped.device)
        if not _select_on_device(select_on_device, ok) and bool(ok):
            return updates, TensorDict({"inner": new_inner, "skipped": skipped}, [])
        new = T.leaves(new_inner)
        if len(new) != len(old):
            raise ValueError(
                f"skip_nonfinite: the inner update returned {len(new)} state leaves, "
                f"init made {len(old)}; a transform's state must keep its structure"
            )
        for n, o in zip(new, old, strict=True):
            torch.where(ok, n, o, out=n)
        zeros: dict[torch.dtype, torch.Tensor] = {}
        for u in us:
            if u.dtype not in zeros:
                zeros[u.dtype] = torch.full((), -0.0, dtype=u.dtype, device=u.device)
            torch.where(ok, u, zeros[u.dtype], out=u)
        skipped.add_(torch.logical_not(ok).to(skipped.dtype))
        return updates, TensorDict({"inner": new_inner, "skipped": skipped}, [])

    return GradientTransformation(init, update)


def _select_on_device(choice: bool | None, flag: torch.Tensor) -> bool:
    """Whether :func:`skip_nonfinite` selects with ``torch.where`` (no host read of ``flag``)."""
    if choice is not None:
        return choice
    plain_cpu = type(flag) is torch.Tensor and flag.device.type == "cpu"  # not a DTensor
    return not plain_cpu or torch.compiler.is_compiling()


def skipped_steps(opt_state: TensorDictBase) -> torch.Tensor | None:
    """The number of steps :func:`skip_nonfinite` dropped, as a 0-d int64 tensor (no host sync).

    Sums every ``skipped`` counter in ``opt_state`` (a :func:`skip_nonfinite` state at any depth
    of a chain); ``None`` when the optimizer has no such wrapper.
    """
    found = [
        t
        for key, t in opt_state.items(True, True)
        if (key if isinstance(key, str) else key[-1]) == "skipped"
        and t.ndim == 0
        and not t.is_floating_point()
    ]
    if not found:
        return None
    total = found[0].clone()
    for t in found[1:]:
        total.add_(t)
    return total


def decoupled(
    direction: GradientTransformation,
    learning_rate: float | Schedule,
    weight_decay: float,
    mask: MaskFn | None,
) -> GradientTransformation:
    """``chain(direction, add_decayed_weights, scale_by_learning_rate)``: an update direction,
    then decoupled weight decay (Loshchilov & Hutter, ICLR 2019), then the (negative) learning
    rate: the tail every AdamW-style optimizer shares."""
    return chain(
        direction, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate)
    )
