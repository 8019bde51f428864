"""Metrics a loss returns beside its sum, each with the reduction it declares.

A loss returns ``(loss_sum, aux)``. ``aux["tokens"]`` is the normaliser (the count the step divides
the summed loss and gradients by). Every other entry is a metric that reaches ``metrics.jsonl``:
a plain tensor is a *sum* (added over microbatches and ranks), or a :class:`Metric` declares its
reduction — ``mean`` (a weighted mean: the value and the weight are summed apart and divided at
the end, so accumulation and world size never change it), ``max`` or ``min``. Everything stays a
tensor: nothing is read on the host inside a step.

Example::

    aux = {"tokens": n, "z_loss": mean(z_sum, n), "max_logit": maximum(logits.max())}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch.utils import _pytree

__all__ = [
    "NORMALISER",
    "Metric",
    "Reduction",
    "as_metric",
    "combine",
    "finalise",
    "maximum",
    "mean",
    "minimum",
    "reduce_over",
    "total",
]

Reduction = Literal["sum", "mean", "max", "min"]
NORMALISER = "tokens"
"""The aux key the step divides by (a count, summed)."""


class Metric:
    """A metric with its reduction; for ``mean``, ``value`` is the weighted *sum* and ``weight``
    the sum of weights (the mean is ``value / weight`` once everything is reduced). A pytree
    node whose tensors are its children and whose reduction is static, so ``torch.func`` sees
    only tensors; a plain class, which ``torch.compile`` traces. Treat it as immutable."""

    __slots__ = ("reduce", "value", "weight")

    def __init__(
        self, value: torch.Tensor, reduce: Reduction = "sum", weight: torch.Tensor | None = None
    ) -> None:
        self.value = value
        self.reduce = reduce
        self.weight = weight

    def __repr__(self) -> str:
        return f"Metric({self.value!r}, {self.reduce!r}, {self.weight!r})"


def _flatten(m: Metric) -> tuple[list[Any], Any]:
    return [m.value, m.weight], m.reduce


def _unflatten(children: Any, reduce: Any) -> Metric:
    value, weight = children
    return Metric(value, reduce, weight)


_pytree.register_pytree_node(
    Metric, _flatten, _unflatten, serialized_type_name="tscale.core.metrics.Metric"
)


def total(value: torch.Tensor) -> Metric:
    """A metric summed over microbatches and ranks."""
    return Metric(value, "sum")


def mean(value_sum: torch.Tensor, weight: torch.Tensor) -> Metric:
    """A weighted mean: ``value_sum`` sums the weighted values, ``weight`` the weights."""
    return Metric(value_sum, "mean", weight)


def maximum(value: torch.Tensor) -> Metric:
    """The largest value over microbatches and ranks."""
    return Metric(value, "max")


def minimum(value: torch.Tensor) -> Metric:
    """The smallest value over microbatches and ranks."""
    return Metric(value, "min")


def as_metric(value: torch.Tensor | Metric) -> Metric:
    return value if isinstance(value, Metric) else Metric(value, "sum")


def _combine_one(a: Metric, b: Metric, name: str) -> Metric:
    if a.reduce != b.reduce:
        raise ValueError(f"metric {name!r} changes its reduction ({a.reduce} then {b.reduce})")
    if a.reduce == "sum":
        return Metric(a.value + b.value, "sum")
    if a.reduce == "mean":
        assert a.weight is not None and b.weight is not None
        return Metric(a.value + b.value, "mean", a.weight + b.weight)
    op = torch.maximum if a.reduce == "max" else torch.minimum
    return Metric(op(a.value, b.value), a.reduce)


def combine(
    a: Mapping[str, torch.Tensor | Metric], b: Mapping[str, torch.Tensor | Metric]
) -> dict[str, Metric]:
    """Two microbatches' aux merged by each metric's reduction (the keys must agree)."""
    if a.keys() != b.keys():
        raise ValueError(f"microbatches returned different metrics: {sorted(a)} vs {sorted(b)}")
    return {k: _combine_one(as_metric(a[k]), as_metric(b[k]), k) for k in a}


def reduce_over(
    aux: Mapping[str, torch.Tensor | Metric],
    all_reduce: Callable[[torch.Tensor, Reduction], torch.Tensor],
) -> dict[str, Metric]:
    """``aux`` reduced across ranks by ``all_reduce(tensor, "sum" | "max" | "min")``."""
    out: dict[str, Metric] = {}
    for k, v in aux.items():
        m = as_metric(v)
        if m.reduce == "mean":
            assert m.weight is not None
            both = all_reduce(torch.stack([m.value.double(), m.weight.double()]), "sum")
            out[k] = Metric(both[0].to(m.value.dtype), "mean", both[1].to(m.weight.dtype))
        else:
            out[k] = Metric(all_reduce(m.value, m.reduce), m.reduce)
    return out


def finalise(aux: Mapping[str, torch.Tensor | Metric]) -> dict[str, torch.Tensor]:
    """Each metric's value: sums, maxima and minima as they are, weighted means divided."""
    out: dict[str, torch.Tensor] = {}
    for k, v in aux.items():
        m = as_metric(v)
        if m.reduce == "mean":
            assert m.weight is not None
            out[k] = m.value / m.weight.to(m.value.dtype).clamp_min(1e-12)
        else:
            out[k] = m.value
    return out
