"""Helpers over TensorDict trees: leaves, maps, partitions, norms and flat views.

A "tree" here is a nested ``TensorDict`` with ``batch_size=[]`` (params, gradients, optimizer
moments). Two trees built from the same params (``zeros_like``, ``torch.func`` gradients, ``apply``)
share key order, so their leaf lists line up index by index; the ``_foreach`` helpers rely on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.errors import ShapeError

Tree = TensorDictBase
SEP = "."


def leaf_keys(tree: Tree) -> list[str]:
    """Dotted names of all leaves in iteration order (``model.layers.0.mlp.up_proj.weight``)."""
    return [k if isinstance(k, str) else SEP.join(k) for k in tree.keys(True, True)]


def leaves(tree: Tree) -> list[torch.Tensor]:
    """All tensor leaves in iteration order (:func:`leaf_keys`' order).

    Plain nested ``TensorDict`` trees (params, gradients, optimizer states) are walked level by
    level, about four times faster than ``values(True, True)``'s generic walk, which the train
    step's optimizer pays a dozen times per step; other tree types take that generic walk."""
    if type(tree) is not TensorDict:
        return list(tree.values(True, True))
    out: list[torch.Tensor] = []
    _collect_leaves(tree, out)
    return out


def _collect_leaves(tree: TensorDict, out: list[torch.Tensor]) -> None:
    for value in tree.values():
        if type(value) is TensorDict:
            _collect_leaves(value, out)
        elif isinstance(value, TensorDictBase):
            out.extend(value.values(True, True))
        else:
            out.append(value)


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> TensorDict:
    """Apply ``fn`` leaf-wise to one or more trees of the same structure; returns a new tree."""
    return tree.apply(fn, *rest)


def zeros_like(tree: Tree, dtype: torch.dtype | None = None) -> TensorDict:
    """A tree of zeros with the structure of ``tree`` (optionally cast to ``dtype``)."""
    return tree.apply(lambda t: torch.zeros_like(t, dtype=dtype))


def clone(tree: Tree) -> TensorDict:
    """A deep copy of ``tree`` (new storage for every leaf), keeping its lock state."""
    out = tree.clone()
    if tree.is_locked:
        out.lock_()
    return out


def is_float(t: torch.Tensor) -> bool:
    """True for floating-point (differentiable) leaves."""
    return t.is_floating_point() or t.is_complex()


def partition(
    tree: Tree, predicate: Callable[[torch.Tensor], bool]
) -> tuple[TensorDict, TensorDict]:
    """Split ``tree`` into (leaves where ``predicate`` holds, the others), both keeping nesting."""
    yes: dict[str, torch.Tensor] = {}
    no: dict[str, torch.Tensor] = {}
    for key, value in tree.items(True, True):
        k = key if isinstance(key, str) else SEP.join(key)
        (yes if predicate(value) else no)[k] = value
    return unflatten(yes), unflatten(no)


def combine(a: Tree, b: Tree) -> TensorDict:
    """Merge two disjoint trees (the inverse of :func:`partition`)."""
    return unflatten({**flatten(a), **flatten(b)})


def flatten(tree: Tree) -> dict[str, torch.Tensor]:
    """A flat ``{dotted.name: tensor}`` dict of the leaves (no copies)."""
    return dict(zip(leaf_keys(tree), leaves(tree), strict=True))


def unflatten(flat: Mapping[str, torch.Tensor]) -> TensorDict:
    """Build a nested tree from ``{dotted.name: tensor}`` (the inverse of :func:`flatten`)."""
    td = TensorDict({}, batch_size=[])
    for key, value in flat.items():
        td.set(tuple(key.split(SEP)), value)
    return td


def assert_same_structure(a: Tree, b: Tree, what: str = "trees") -> None:
    """Raise :class:`ShapeError` unless ``a`` and ``b`` have the same keys, shapes and order."""
    ka, kb = leaf_keys(a), leaf_keys(b)
    if ka != kb:
        missing = sorted(set(ka) - set(kb))[:5]
        extra = sorted(set(kb) - set(ka))[:5]
        raise ShapeError(f"{what} differ in structure: missing {missing}, extra {extra}")
    for k, x, y in zip(ka, leaves(a), leaves(b), strict=True):
        if x.shape != y.shape:
            raise ShapeError(f"{what} differ at {k!r}: shape {tuple(x.shape)} vs {tuple(y.shape)}")


def global_norm(tree: Tree | Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all leaves together as a 0-d tensor, without a host sync.

    Float64 if any leaf is float64, else float32. Same reduction as
    ``torch.nn.utils.clip_grad_norm_`` (per-leaf norms, then the norm of those).
    """
    ts = leaves(tree) if isinstance(tree, TensorDictBase) else list(tree)
    if not ts:
        return torch.zeros((), dtype=torch.float32)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    norms = torch._foreach_norm(ts)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def num_elements(tree: Tree) -> int:
    """Total number of scalar elements over all leaves."""
    return sum(t.numel() for t in leaves(tree))


def num_bytes(tree: Tree) -> int:
    """Total storage of all leaves in bytes."""
    return sum(t.numel() * t.element_size() for t in leaves(tree))
