"""DDP over the functional step: every rank holds the params; summed gradients are all-reduced.

The step (:func:`tscale.step.make_train_step`) computes the *sum* of the token losses of its
local batch and their gradients; :func:`make_ddp_sync` all-reduces both (and the token count) in
buckets, and the step then divides by the global token count. The result equals one process
stepping on the global batch, whatever the world size or the number of microbatches.

:class:`OverlappedDDP` starts the all-reduce of each layer's gradients in the backward, as soon
as the backward leaves that layer (through the model's ``gather`` hook), so the reduction of the
later layers runs while the earlier layers' gradients are computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import torch
import torch.distributed as dist
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.core.metrics import Metric, reduce_over
from tscale.models.lora import LoraModel
from tscale.models.protocol import Frozen, Gather, Wrapper, layers
from tscale.step.compose import GradSync, MetricSync

__all__ = [
    "OverlappedDDP",
    "OverlappedModel",
    "all_reduce_counts",
    "bucket_indices",
    "make_ddp_sync",
    "make_metric_sync",
]


def bucket_indices(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive groups of leaf indices of at most ``bucket_bytes`` each (a larger leaf is a
    bucket of its own). One all-reduce per bucket: few large messages, not one per leaf."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets


def all_reduce_counts(
    loss_sum: torch.Tensor, tokens: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the loss and the token count over ``group`` in one float64 message (token counts
    stay exact up to 2**53)."""
    both = torch.stack([loss_sum.detach().double(), tokens.double()])
    dist.all_reduce(both, group=group)
    return both[0].to(loss_sum.dtype), both[1].round().to(tokens.dtype)


def make_ddp_sync(
    group: dist.ProcessGroup | None,
    *,
    bucket_mb: float = 25.0,
    reduce_dtype: torch.dtype | None = None,
) -> GradSync:
    """The ``grad_sync`` of a DDP step: bucketed all-reduce (sum) of the gradients over ``group``.

    Args:
        group: the data-parallel process group (None: the default group).
        bucket_mb: bucket size in MiB; every bucket is one asynchronous all-reduce, all in flight
            together, then waited for.
        reduce_dtype: dtype of the reduction (default: the gradients' own); float32 reductions
            of bf16 gradients avoid summing in bf16.
    """
    bucket_bytes = max(1, int(bucket_mb * 2**20))

    def sync(
        grads: TensorDictBase, loss_sum: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[TensorDictBase, torch.Tensor, torch.Tensor]:
        leaves = T.leaves(grads)
        dtype = reduce_dtype
        counts = torch.stack([loss_sum.detach().double(), tokens.double()])
        works = [dist.all_reduce(counts, group=group, async_op=True)]
        flats: list[tuple[list[int], torch.Tensor]] = []
        sizes = [t.numel() * (dtype or t.dtype).itemsize for t in leaves]
        for idx in bucket_indices(sizes, bucket_bytes):
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i in idx:
                by_dtype.setdefault(dtype or leaves[i].dtype, []).append(i)
            for dt, ids in by_dtype.items():
                flat = torch.cat([leaves[i].reshape(-1).to(dt) for i in ids])
                works.append(dist.all_reduce(flat, group=group, async_op=True))
                flats.append((ids, flat))
        for w in works:
            w.wait()
        for ids, flat in flats:
            pieces = flat.split([leaves[i].numel() for i in ids])
            for i, piece in zip(ids, pieces, strict=True):
                leaves[i].copy_(piece.view_as(leaves[i]))
        return grads, counts[0].to(loss_sum.dtype), counts[1].round().to(tokens.dtype)

    return sync


class _ReduceInBackward(torch.autograd.Function):
    """Identity in the forward; in the backward one asynchronous all-reduce of the group's
    gradients, flattened into one buffer. The gradients handed on are views of that buffer:
    nothing may read them before :meth:`OverlappedDDP.sync` waits for the reduction."""

    @staticmethod
    def forward(ctx: Any, owner: OverlappedDDP, *params: torch.Tensor):
        ctx.owner = owner
        ctx.like = [(p.shape, p.dtype) for p in params]
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        owner: OverlappedDDP = ctx.owner
        dtype = ctx.like[0][1]
        parts = [
            torch.zeros(shape, dtype=dt) if g is None else g
            for g, (shape, dt) in zip(grads, ctx.like, strict=True)
        ]
        flat = torch.cat([g.reshape(-1).to(dtype) for g in parts])
        owner.works.append(dist.all_reduce(flat, group=owner.group, async_op=True))
        sizes = [g.numel() for g in parts]
        outs = [v.view(shape) for v, (shape, _) in zip(flat.split(sizes), ctx.like, strict=True)]
        return (None, *outs)


class OverlappedDDP:
    """DDP with the gradient all-reduce overlapped with the backward, per layer.

    ``wrap(model)`` gives the whole model protocol (:class:`OverlappedModel`, e.g. for the
    fused loss); ``apply(model_apply)`` wraps a model ``apply(params, batch, gather=...)`` so
    that every layer (and the non-layer params) passes its params through
    :class:`_ReduceInBackward`; ``sync`` is
    the step's ``grad_sync``: it waits for the reductions started in the backward and reduces the
    loss and token count. One microbatch per step only (with accumulation the microbatches'
    gradients would be summed while still in flight); every group's leaves share one dtype.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.works: list[Any] = []

    def gather(self, stored: TensorDictBase) -> TensorDictBase:
        leaves = T.leaves(stored)
        if len({t.dtype for t in leaves}) != 1:
            raise ValueError("OverlappedDDP needs one dtype per layer's params")
        views = _ReduceInBackward.apply(self, *leaves)
        return T.unflatten(dict(zip(T.leaf_keys(stored), views, strict=True)))

    def wrap(self, model: Any) -> OverlappedModel:
        """``model`` (a :class:`~tscale.models.protocol.LanguageModel`) with this overlap's
        ``gather`` passed to every method (see :class:`OverlappedModel`)."""
        return OverlappedModel(model, self)

    def sync(
        self, grads: TensorDictBase, loss_sum: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[TensorDictBase, torch.Tensor, torch.Tensor]:
        loss_sum, tokens = all_reduce_counts(loss_sum, tokens, self.group)
        works, self.works = self.works, []
        for w in works:
            w.wait()
        return grads, loss_sum, tokens


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def make_metric_sync(group: dist.ProcessGroup | None) -> MetricSync:
    """The ``metric_sync`` of a data-parallel step: each metric a loss returns is reduced over
    ``group`` as it declares (sums and weighted means summed, maxima and minima by max / min)."""

    def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=_OPS[op], group=group)
        return out

    def sync(aux: Mapping[str, Metric]) -> dict[str, Metric]:
        return reduce_over(aux, all_reduce)

    return sync


@attrs.frozen(eq=False)
class OverlappedModel(Wrapper):
    """:class:`OverlappedDDP`'s apply as a model wrapper: every method of the
    :class:`~tscale.models.protocol.LanguageModel` protocol runs ``inner`` with
    ``gather=ddp.gather``, so each layer's gradient all-reduce starts in the backward (the
    step's ``grad_sync`` is ``ddp.sync``).

    The hook sees the tree the innermost model computes with; that must be the trainable
    params, so LoRA (whose decoder computes with the frozen base) is refused.

    Raises:
        ValueError: LoRA in the stack.
    """

    inner: Any
    ddp: OverlappedDDP

    def __attrs_post_init__(self) -> None:
        if any(isinstance(m, LoraModel) for m in layers(self.inner)):
            raise ValueError(
                "OverlappedModel over LoRA: the overlap hook would see the frozen base, not the "
                "adapters; reduce the adapters' gradients with make_ddp_sync instead"
            )

    @contextmanager
    def around(
        self, params: TensorDictBase, gather: Gather | None, frozen: Frozen | None
    ) -> Iterator[tuple[TensorDictBase, Gather]]:
        """The params as they are, and the overlap's hook."""
        if gather is not None:
            raise ValueError("OverlappedModel is the outermost wrapper: it takes no gather hook")
        yield params, self.ddp.gather
