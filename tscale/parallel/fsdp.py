"""FSDP over the functional step: params and optimizer state sharded as DTensors, layers
all-gathered on use, gradients reduce-scattered in the backward.

Layout. Every param leaf is a ``DTensor`` on the mesh, ``Shard(0)`` over ``dp_shard`` (and
``Replicate()`` over ``dp_replicate`` for HSDP): each rank stores a contiguous block of rows.
The optimizer state mirrors it. The placements are data in the :class:`~tscale.core.TrainState`,
so ``torch.distributed.checkpoint`` saves and reshards them (2 ranks → 1, 1 → 2).

Compute. The step runs on the ranks' *local* shards as plain tensors (DTensor dispatch costs
tens of microseconds per op, more than a small optimizer's whole update):

- the model's ``gather`` hook (:data:`tscale.models.protocol.Gather`) turns a layer's local
  shards into full tensors with **one** ``all_gather_into_tensor`` per layer (all its leaves
  flattened into one buffer), cast to the compute dtype first (bf16 halves the traffic); its
  backward flattens the layer's gradients and **one** ``reduce_scatter_tensor`` in the reduce dtype
  hands each rank the summed gradient of its rows (HSDP: then an all-reduce over replicas);
- with ``reshard_after_forward`` the gathered weights the backward needs are not kept: a
  saved-tensor hook stores a token for them and all-gathers the layer again when the backward
  reaches it (FSDP's reshard-after-forward, without modules or hooks on them);
- the optimizer updates the local shards elementwise; clipping and the ``grad_norm`` metric use
  the norm of the whole, summed across shards (:func:`sharded_norm`).

Optimizers whose update is not elementwise per shard (Muon's orthogonalisation, Prodigy's
global dot products, Sophia's Hessian step) are rejected with a clear error under sharding.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.models.lora import LoraModel
from tscale.models.protocol import Frozen, Gather, Wrapper, layers
from tscale.models.stack import CastModel
from tscale.parallel.ddp import all_reduce_counts
from tscale.parallel.mesh import REPLICATE, SHARD
from tscale.step.compose import GradSync, StepFn

__all__ = [
    "FSDPLayout",
    "ShardedModel",
    "full_tree",
    "local_tree",
    "make_fsdp_sync",
    "shard_tree",
    "sharded_norm",
    "wrap_fsdp_step",
    "wrap_local_frozen",
]


def _rows_per_rank(rows: int, world: int) -> list[int]:
    """Rows each rank holds under ``Shard(0)`` (``torch.chunk`` semantics, as DTensor)."""
    size = math.ceil(rows / world) if rows else 0
    out = []
    for r in range(world):
        start = min(r * size, rows)
        out.append(max(0, min(size, rows - start)))
    return out


def _placements(mesh: DeviceMesh) -> list[Any]:
    names = mesh.mesh_dim_names or ()
    return [Replicate() if n == REPLICATE else Shard(0) for n in names]


def _shard_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """(this rank's index on the shard axis, the shard axis size)."""
    return mesh.get_local_rank(SHARD), mesh.size(mesh.mesh_dim_names.index(SHARD))


def shard_tree(tree: TensorDictBase, mesh: DeviceMesh) -> TensorDict:
    """DTensors holding this rank's rows of every leaf of ``tree`` (the same full tree on every
    rank, e.g. from the same seed) — no communication.

    Raises:
        ShapeError: a 0-d leaf (nothing to shard).
    """
    rank, world = _shard_rank(mesh)
    placements = _placements(mesh)

    def one(name: str, t: torch.Tensor) -> DTensor:
        if t.dim() == 0:
            raise ShapeError(f"param {name!r} is 0-d: FSDP shards rows and cannot shard it")
        rows = _rows_per_rank(t.shape[0], world)
        start = sum(rows[:rank])
        local = t.narrow(0, start, rows[rank]).clone()
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride()
        )

    return T.unflatten({k: one(k, v) for k, v in T.flatten(tree).items()})


def shard_opt_state(
    opt_state: TensorDictBase, params: TensorDictBase, mesh: DeviceMesh
) -> TensorDict:
    """DTensors for an optimizer state built from the local shards of ``params`` (a DTensor
    tree): a leaf shaped like its param's shard takes the param's placements; a 0-d leaf (a
    count) is replicated; any other leaf (e.g. 8-bit Adam's per-block scales) is sharded by rows,
    its global length summed over the shard axis.

    Raises:
        ShapeError: a per-block leaf whose shards do not line up with ``Shard(0)`` (8-bit states
            need every rank's shard to be a whole number of quantisation blocks).
    """
    flat_params = T.flatten(params)
    names = sorted(flat_params, key=len, reverse=True)
    rank, world = _shard_rank(mesh)

    def owner(key: str) -> str | None:
        for n in names:
            if key == n or key.endswith("." + n):
                return n
        return None

    out: dict[str, torch.Tensor] = {}
    for key, v in T.flatten(opt_state).items():
        name = owner(key)
        if v.dim() == 0:
            out[key] = DTensor.from_local(
                v, mesh, [Replicate()] * mesh.ndim, run_check=False, shape=v.shape
            )
            continue
        ref = flat_params.get(name) if name else None
        if isinstance(ref, DTensor) and v.shape == ref._local_tensor.shape:
            out[key] = DTensor.from_local(
                v, mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride()
            )
            continue
        lengths = torch.zeros(world, dtype=torch.int64)
        lengths[rank] = v.shape[0]
        dist.all_reduce(lengths, group=mesh.get_group(SHARD))
        total = int(lengths.sum())
        if lengths.tolist() != _rows_per_rank(total, world):
            raise ShapeError(
                f"optimizer state {key!r} has {lengths.tolist()} rows on the shard ranks, which "
                "is not a row sharding of one tensor; for 8-bit states make each shard a whole "
                "number of quantisation blocks (optimizer.block_size) or use parallel.dp_shard: 1"
            )
        shape = (total, *v.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        out[key] = DTensor.from_local(
            v, mesh, _placements(mesh), run_check=False, shape=torch.Size(shape), stride=stride
        )
    return _fill(opt_state, out)


def _fill(like: TensorDictBase, flat: dict[str, torch.Tensor]) -> TensorDict:
    """A tree with the structure of ``like`` (empty sub-states kept) holding ``flat``."""
    result = like.empty(recurse=True)
    for k, v in flat.items():
        result.set(tuple(k.split(T.SEP)), v)
    return result


def local_tree(tree: TensorDictBase) -> TensorDict:
    """The local shards of a DTensor tree as plain tensors (views, no copies); other leaves
    as they are."""
    return tree.apply(lambda t: t._local_tensor if isinstance(t, DTensor) else t)


def full_tree(tree: TensorDictBase) -> TensorDict:
    """Full tensors of a DTensor tree (all-gathers; every rank must call it)."""
    return tree.apply(lambda t: t.full_tensor() if isinstance(t, DTensor) else t)


@attrs.frozen(kw_only=True)
class _LeafPlan:
    shape: tuple[int, ...]
    rows: tuple[int, ...]  # per shard rank

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])


@attrs.frozen(kw_only=True)
class FSDPLayout:
    """Placements of a sharded run: the mesh, compute and reduce dtypes, and the shape plan of
    every param leaf (by dotted name) so that gathers need no metadata exchange."""

    mesh: DeviceMesh
    leaves: dict[str, _LeafPlan]
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True

    @staticmethod
    def of(
        params: TensorDictBase,
        mesh: DeviceMesh,
        *,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
        reshard_after_forward: bool = True,
    ) -> FSDPLayout:
        """The layout of a tree of (full, unsharded) params."""
        _, world = _shard_rank(mesh)
        plans = {
            k: _LeafPlan(shape=tuple(v.shape), rows=tuple(_rows_per_rank(v.shape[0], world)))
            for k, v in T.flatten(params).items()
        }
        return FSDPLayout(
            mesh=mesh,
            leaves=plans,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=reshard_after_forward,
        )

    @property
    def shard_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group(SHARD)

    @property
    def replicate_group(self) -> dist.ProcessGroup | None:
        names = self.mesh.mesh_dim_names or ()
        if REPLICATE in names and self.mesh.size(names.index(REPLICATE)) > 1:
            return self.mesh.get_group(REPLICATE)
        return None


# ---------------------------------------------------------------------------- gather / scatter


def _all_gather(
    layout: FSDPLayout, plans: list[_LeafPlan], shards: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Full tensors of one group of leaves from every rank's shards: one collective."""
    rank, world = _shard_rank(layout.mesh)
    dtype = layout.param_dtype or shards[0].dtype
    per_rank = [sum(p.rows[r] * p.row_numel for p in plans) for r in range(world)]
    width = max(per_rank)
    flat = shards[0].new_zeros(width, dtype=dtype)
    torch.cat([s.reshape(-1).to(dtype) for s in shards], out=flat[: per_rank[rank]])
    out = flat.new_empty(world * width)
    dist.all_gather_into_tensor(out, flat, group=layout.shard_group)
    chunks = out.view(world, width)
    pieces: list[list[torch.Tensor]] = [[] for _ in plans]
    for r in range(world):
        offset = 0
        for i, p in enumerate(plans):
            n = p.rows[r] * p.row_numel
            pieces[i].append(chunks[r, offset : offset + n].view(p.rows[r], *p.shape[1:]))
            offset += n
    return [torch.cat(ps, dim=0) for ps in pieces]


def _reduce_scatter(
    layout: FSDPLayout,
    plans: list[_LeafPlan],
    grads: list[torch.Tensor | None],
    like: list[tuple[torch.Size, torch.dtype]],
    device: torch.device,
) -> list[torch.Tensor]:
    """This rank's rows of the gradients summed over all ranks: one collective (plus one
    all-reduce over replicas for HSDP)."""
    rank, world = _shard_rank(layout.mesh)
    found = [g.dtype for g in grads if g is not None]
    dtype = layout.reduce_dtype or (found[0] if found else like[0][1])
    per_rank = [sum(p.rows[r] * p.row_numel for p in plans) for r in range(world)]
    width = max(per_rank)
    send = torch.zeros(world, width, dtype=dtype, device=device)
    for r in range(world):
        offset = 0
        parts = []
        start_rows = [sum(p.rows[:r]) for p in plans]
        for p, g, start in zip(plans, grads, start_rows, strict=True):
            n = p.rows[r] * p.row_numel
            if g is not None and n:
                parts.append(g.narrow(0, start, p.rows[r]).reshape(-1).to(dtype))
            elif n:
                parts.append(send.new_zeros(n))
            offset += n
        if parts:
            torch.cat(parts, out=send[r, :offset])
    recv = send.new_empty(width)
    dist.reduce_scatter_tensor(recv, send.view(-1), group=layout.shard_group)
    rep = layout.replicate_group
    if rep is not None:
        dist.all_reduce(recv, group=rep)
    out = []
    offset = 0
    for p, (shape, ref_dtype) in zip(plans, like, strict=True):
        n = p.rows[rank] * p.row_numel
        out.append(recv[offset : offset + n].view(shape).to(ref_dtype))
        offset += n
    return out


class _GatherGroup(torch.autograd.Function):
    """Forward: all-gather a group's shards; backward: reduce-scatter its gradients."""

    @staticmethod
    def forward(ctx: Any, layout: FSDPLayout, plans: list[_LeafPlan], *shards: torch.Tensor):
        ctx.layout, ctx.plans = layout, plans
        ctx.like = [(s.shape, s.dtype) for s in shards]
        ctx.device = shards[0].device
        return tuple(_all_gather(layout, plans, list(shards)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        out = _reduce_scatter(ctx.layout, ctx.plans, list(grads), ctx.like, ctx.device)
        return (None, None, *out)


class _Regather:
    """Saved-tensor hooks that keep no gathered weight alive between forward and backward:
    a tensor living in a gathered group's storage is saved as a token and all-gathered again
    when the backward unpacks it (once per group; dropped after its last use)."""

    def __init__(self, layout: FSDPLayout) -> None:
        self.layout = layout
        self.owner: dict[int, tuple[int, int]] = {}  # storage pointer -> (group, leaf)
        self.groups: dict[int, tuple[list[_LeafPlan], list[torch.Tensor]]] = {}
        self.pending: dict[int, int] = {}
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.next_id = 0

    def register(
        self, plans: list[_LeafPlan], shards: list[torch.Tensor], fulls: list[torch.Tensor]
    ) -> None:
        gid = self.next_id
        self.next_id += 1
        self.groups[gid] = (plans, [s.detach() for s in shards])
        self.pending[gid] = 0
        for i, full in enumerate(fulls):
            ptr = full.untyped_storage().data_ptr()
            self.owner[ptr] = (gid, i)
            # the storage can only be reused after this tensor dies: forget it then
            weakref.finalize(full, self.owner.pop, ptr, None)

    def pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta" or not t.untyped_storage().data_ptr():
            return t
        hit = self.owner.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        gid, i = hit
        self.pending[gid] += 1
        return (_TOKEN, gid, i, t.size(), t.stride(), t.storage_offset(), t.requires_grad)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] is _TOKEN):
            return packed
        _, gid, i, size, stride, offset, _ = packed
        fulls = self.cache.get(gid)
        if fulls is None:
            plans, shards = self.groups[gid]
            with torch.no_grad():
                fulls = _all_gather(self.layout, plans, shards)
            self.cache[gid] = fulls
        self.pending[gid] -= 1
        if self.pending[gid] == 0:
            del self.cache[gid]
        return fulls[i].as_strided(size, stride, offset)


_TOKEN = object()


def make_gather(
    layout: FSDPLayout, plans: dict[int, _LeafPlan], regather: _Regather | None = None
) -> Callable[[TensorDictBase], TensorDict]:
    """The model's ``gather`` hook over local shards; ``plans`` maps ``id(shard)`` to the
    leaf's plan (the shards are the very tensors of the params tree the model was given)."""

    def gather(group: TensorDictBase) -> TensorDict:
        names = T.leaf_keys(group)
        shards = T.leaves(group)
        if not shards:
            return group.clone(False)
        fulls = _GatherGroup.apply(layout, [plans[id(s)] for s in shards], *shards)
        if regather is not None:
            regather.register([plans[id(s)] for s in shards], shards, list(fulls))
        return T.unflatten(dict(zip(names, fulls, strict=True)))

    return gather


# ---------------------------------------------------------------------------- the step


def sharded_norm(layout: FSDPLayout) -> Callable[..., torch.Tensor]:
    """Global L2 norm of sharded leaves: local sums of squares summed over the shard axis."""

    def norm(tree: TensorDictBase | list[torch.Tensor]) -> torch.Tensor:
        leaves = T.leaves(tree) if isinstance(tree, TensorDictBase) else list(tree)
        if not leaves:
            return torch.zeros((), dtype=torch.float32)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32
        sq = torch.stack([n.to(dtype) ** 2 for n in torch._foreach_norm(leaves)]).sum()
        dist.all_reduce(sq, group=layout.shard_group)
        return sq.sqrt()

    return norm


def make_fsdp_sync(world_group: dist.ProcessGroup | None) -> GradSync:
    """The ``grad_sync`` of an FSDP step: gradients are already reduce-scattered in the
    backward; only the loss and the token count are summed over all ranks."""

    def sync(grads: TensorDictBase, loss_sum: torch.Tensor, tokens: torch.Tensor):
        loss_sum, tokens = all_reduce_counts(loss_sum, tokens, world_group)
        return grads, loss_sum, tokens

    return sync


@contextmanager
def _regather_hooks(regather: _Regather | None) -> Iterator[None]:
    if regather is None:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(regather.pack, regather.unpack):
        yield


@attrs.frozen(eq=False)
class ShardedModel(Wrapper):
    """FSDP's per-layer gather as a model wrapper: every method of the
    :class:`~tscale.models.protocol.LanguageModel` protocol runs the inner model with a
    ``gather`` hook over this rank's local shards (one all-gather per layer, a reduce-scatter of
    its gradients in the backward; with ``reshard_after_forward`` a re-gather in the backward).

    Attributes:
        inner: the model (a ``Transformer``, or the stack of :func:`tscale.models.stack.stack_model`
            without a ``CastModel``: ``layout.param_dtype`` casts inside the gather).
        layout: the placements (:meth:`FSDPLayout.of` over the full tree that is sharded).
        tree: which tree holds the shards: None for ``params`` (the trainable tree), or the name
            of a frozen tree (``"base"``: LoRA over a sharded frozen base; the adapters are then
            plain replicated tensors whose gradients a DDP ``grad_sync`` reduces).

    Raises:
        ValueError: a ``CastModel`` in the stack, or LoRA with ``tree=None`` (LoRA hands the
            gather its base, not its adapters).
    """

    inner: Any
    layout: FSDPLayout
    tree: str | None = None

    def __attrs_post_init__(self) -> None:
        stack = layers(self.inner)
        if any(isinstance(m, CastModel) for m in stack):
            raise ValueError(
                "ShardedModel over a CastModel: under FSDP the compute dtype is the layout's "
                "param_dtype (cast inside the gather); build the stack without param_dtype"
            )
        if self.tree is None and any(isinstance(m, LoraModel) for m in stack):
            raise ValueError(
                "ShardedModel over LoRA shards the frozen base: pass tree='base' (the adapters "
                "stay replicated)"
            )

    @contextmanager
    def around(
        self, params: TensorDictBase, gather: Gather | None, frozen: Frozen | None
    ) -> Iterator[tuple[TensorDictBase, Gather]]:
        """The params as they are, and the gather hook over this rank's shards (of ``params``,
        or of ``frozen[tree]``), with the re-gather hooks of ``reshard_after_forward``."""
        if gather is not None:
            raise ValueError("ShardedModel is the outermost wrapper: it takes no gather hook")
        if self.tree is None:
            stored = params
        elif frozen is None or self.tree not in frozen:
            raise ValueError(f"ShardedModel(tree={self.tree!r}) needs frozen[{self.tree!r}]")
        else:
            stored = frozen[self.tree]
        layout = self.layout
        regather = _Regather(layout) if layout.reshard_after_forward else None
        plans = {id(t): layout.leaves[k] for k, t in T.flatten(stored).items()}
        with _regather_hooks(regather):
            yield params, make_gather(layout, plans, regather)


def wrap_fsdp_step(step: StepFn) -> StepFn:
    """``step`` over local shards → a step over a state of DTensors (same placements out)."""

    def wrapped(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, dict]:
        local = state.replace(
            params=_locked(local_tree(state.params)), opt_state=local_tree(state.opt_state)
        )
        new, metrics = step(local, batch)
        out = state.replace(
            params=_locked(_relocal(new.params, state.params)),
            opt_state=_relocal(new.opt_state, state.opt_state),
            step=new.step,
            rng=new.rng,
        )
        return out, metrics

    return wrapped


def wrap_local_frozen(step: StepFn) -> StepFn:
    """``step`` over local shards of the frozen trees → a step over a state whose frozen trees
    hold DTensors (a sharded LoRA base); the trained params are plain tensors throughout."""

    def wrapped(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, dict]:
        frozen = {k: local_tree(v) if isinstance(v, TensorDictBase) else v
                  for k, v in state.frozen.items()}  # fmt: skip
        new, metrics = step(state.replace(frozen=frozen), batch)
        return new.replace(frozen=state.frozen), metrics

    return wrapped


def _locked(tree: TensorDictBase) -> TensorDictBase:
    return tree.lock_() if not tree.is_locked else tree


def _relocal(local: TensorDictBase, like: TensorDictBase) -> TensorDict:
    """Re-wrap new local tensors as DTensors with the placements of ``like`` (leaf by leaf)."""
    flat_like = T.flatten(like)
    out = {}
    for k, v in T.flatten(local).items():
        ref = flat_like[k]
        if isinstance(ref, DTensor):
            if v is ref._local_tensor:
                out[k] = ref
            else:
                out[k] = DTensor.from_local(
                    v,
                    ref.device_mesh,
                    ref.placements,
                    run_check=False,
                    shape=ref.shape,
                    stride=ref.stride(),
                )
        else:
            out[k] = v
    return _fill(like, out)
