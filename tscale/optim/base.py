"""The optimizer contract (optax style): a transform is a pair of pure functions.

``init(params) -> state`` builds the transform's state, a TensorDict (empty when stateless).
``update(updates, state, params, **extra) -> (updates, state)`` turns gradients into updates;
``extra`` are keyword arguments some transforms need besides the gradients (optax's "extra
args"), such as Sophia-G's ``hessian`` estimate, which the step computes. A transform ignores the
extra arguments it does not know, and :func:`chain` passes them to every member.

Ownership (DESIGN.md §2): ``update`` consumes ``updates`` and ``state`` — it may modify their
tensors in place (``torch._foreach_*_``) and return them — and never modifies ``params``. The
final updates are *added* to the params by :func:`apply_updates` (so a learning rate enters as a
negative scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T

InitFn = Callable[[TensorDictBase], TensorDictBase]
UpdateFn = Callable[..., tuple[TensorDictBase, TensorDictBase]]
"""``update(updates, state, params=None, **extra) -> (updates, state)``."""

Schedule = Callable[[Any], Any]
"""``schedule(step) -> lr``: a Python int gives a float, a 0-d tensor gives a 0-d tensor."""


def check_real(name: str, value: object) -> float:
    """``value`` as a finite float, or a ValueError naming ``name`` (the package's validator)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


class GradientTransformation(NamedTuple):
    """A pair ``(init, update)`` of pure functions over TensorDict trees."""

    init: InitFn
    update: UpdateFn


def empty_state() -> TensorDict:
    """The state of a stateless transform."""
    return TensorDict({}, batch_size=[])


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged (the unit of :func:`chain`)."""

    def init(params: TensorDictBase) -> TensorDict:
        return empty_state()

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        return updates, state

    return GradientTransformation(init, update)


class _Chain(GradientTransformation):
    """A :func:`chain`; it keeps its members so that a chain inside a chain is spliced in."""

    members: tuple[GradientTransformation, ...]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right; the state is ``{"0": s0, "1": s1, ...}``.

    A chain among the arguments is spliced in (``chain(a, chain(b, c)) == chain(a, b, c)``,
    state included), so the state of an optimizer keeps one layout whether or not the builder
    puts a clip in front of it. ``extra`` keyword arguments of ``update`` reach every member;
    without any, members are called with three arguments (a user's transform need not take
    ``**extra`` until an optimizer in its chain needs extra arguments).

    Raises:
        ValueError: an argument is not a :class:`GradientTransformation`.
    """
    members: list[GradientTransformation] = []
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            raise ValueError(
                f"chain argument {i} must be a GradientTransformation, got {type(tx).__name__}"
                " (did you pass the factory instead of calling it?)"
            )
        members.extend(tx.members if isinstance(tx, _Chain) else (tx,))

    def init(params: TensorDictBase) -> TensorDict:
        states = {str(i): tx.init(params) for i, tx in enumerate(members)}
        return TensorDict(states, batch_size=[])

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        new_states: dict[str, TensorDictBase] = {}
        for i, tx in enumerate(members):
            updates, new_states[str(i)] = tx.update(updates, state[str(i)], params, **extra)
        return updates, TensorDict(new_states, batch_size=[])

    out = _Chain(init, update)
    out.members = tuple(members)
    return out


def apply_updates(params: TensorDictBase, updates: TensorDictBase) -> TensorDictBase:
    """Add ``updates`` to ``params`` in place (the step owns ``params``) and return ``params``."""
    ps = T.leaves(params)
    us = T.leaves(updates)
    if len(ps) != len(us):
        T.assert_same_structure(params, updates, "params and updates")
    if not ps:
        return params
    us = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(ps, us, strict=True)]
    torch._foreach_add_(ps, us)
    return params
