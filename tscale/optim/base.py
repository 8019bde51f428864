"""The optimizer contract (optax style): a transform is a pair of pure functions.

``init(params) -> state`` builds the transform's state, a TensorDict (empty when stateless).
``update(updates, state, params) -> (updates, state)`` turns gradients into updates.

Ownership (DESIGN.md §2): ``update`` consumes ``updates`` and ``state`` — it may modify their
tensors in place (``torch._foreach_*_``) and return them — and never modifies ``params``. The
final updates are *added* to the params by :func:`apply_updates` (so a learning rate enters as a
negative scale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T

InitFn = Callable[[TensorDictBase], TensorDictBase]
UpdateFn = Callable[
    [TensorDictBase, TensorDictBase, TensorDictBase | None], tuple[TensorDictBase, TensorDictBase]
]


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
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None = None
    ) -> tuple[TensorDictBase, TensorDictBase]:
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right; the state is ``{"0": s0, "1": s1, ...}``.

    Raises:
        ValueError: an argument is not a :class:`GradientTransformation`.
    """
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            raise ValueError(
                f"chain argument {i} must be a GradientTransformation, got {type(tx).__name__}"
                " (did you pass the factory instead of calling it?)"
            )

    def init(params: TensorDictBase) -> TensorDict:
        states = {str(i): tx.init(params) for i, tx in enumerate(transforms)}
        return TensorDict(states, batch_size=[])

    def update(
        updates: TensorDictBase, state: TensorDictBase, params: TensorDictBase | None = None
    ) -> tuple[TensorDictBase, TensorDictBase]:
        new_states: dict[str, TensorDictBase] = {}
        for i, tx in enumerate(transforms):
            updates, new_states[str(i)] = tx.update(updates, state[str(i)], params)
        return updates, TensorDict(new_states, batch_size=[])

    return GradientTransformation(init, update)


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
