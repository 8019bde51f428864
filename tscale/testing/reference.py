"""Helpers for comparing a transform with a hand-written reference (a paper's update rule
transcribed over plain tensors), leaf by leaf in float64."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T


def random_case(
    shapes: Mapping[str, Sequence[int]],
    *,
    steps: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[TensorDict, dict[str, torch.Tensor], list[TensorDict]]:
    """Random params and ``steps`` gradient trees for leaves named like ``shapes`` (dotted
    names), drawn from one generator seeded with ``seed``.

    Returns ``(params, reference, grads)``: the params as a tree, a flat ``{name: tensor}``
    copy of them for the reference implementation to update, and the gradients of every step.
    """
    g = torch.Generator().manual_seed(seed)

    def draw() -> dict[str, torch.Tensor]:
        return {k: torch.randn(tuple(s), generator=g, dtype=dtype) for k, s in shapes.items()}

    flat = draw()
    grads = [T.unflatten(draw()) for _ in range(steps)]
    return T.unflatten(flat), {k: v.clone() for k, v in flat.items()}, grads


def max_abs_diff(tree: TensorDictBase, reference: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between ``tree``'s leaves and ``reference``'s tensors of
    the same dotted names (every name of ``reference`` must be in ``tree``)."""
    flat = T.flatten(tree)
    return max(float((flat[k] - ref).abs().max()) for k, ref in reference.items())
