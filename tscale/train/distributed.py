"""The trainer's side of data parallelism: the plan from ``parallel:`` and torchrun, the
wrapped step, the sharded state, and the collectives the loop itself needs.

Everything numeric lives in :mod:`tscale.parallel`; this module only assembles it from the
config (configs stop at the builders).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.distributed as dist
from tensordict import TensorDictBase

from tscale.config.schema import Config
from tscale.core.state import TrainState
from tscale.errors import ConfigError
from tscale.models.transformer import Transformer
from tscale.optim.base import GradientTransformation
from tscale.parallel import ddp, fsdp
from tscale.parallel.mesh import ParallelPlan, init_distributed, plan_parallel
from tscale.step.compose import StepFn

__all__ = ["Parallel", "cast_apply", "setup"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class Parallel:
    """This process's place in the run and the layout of a sharded state (None unsharded)."""

    plan: ParallelPlan
    device: torch.device
    layout: fsdp.FSDPLayout | None = None

    @property
    def is_main(self) -> bool:
        return self.plan.is_main

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def barrier(self) -> None:
        self.plan.barrier()

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Sum a few host numbers over all ranks (one small all-reduce; identity alone)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def norm_fn(self) -> Callable[..., torch.Tensor] | None:
        """The clip norm of a sharded optimizer (None: the plain global norm)."""
        return fsdp.sharded_norm(self.layout) if self.layout is not None else None

    def init_state(
        self, params: TensorDictBase, tx: GradientTransformation, rng: torch.Tensor
    ) -> TrainState:
        """The step-0 state: sharded DTensors under FSDP (each rank keeps its rows of the
        same full init), the plain state otherwise."""
        if self.layout is None:
            return TrainState.create(params, tx.init(params), rng)
        mesh = self.layout.mesh
        sharded = fsdp.shard_tree(params, mesh)
        opt_state = fsdp.shard_opt_state(tx.init(fsdp.local_tree(sharded)), sharded, mesh)
        return TrainState.create(sharded, opt_state, rng)

    def full_params(self, params: TensorDictBase) -> TensorDictBase:
        """Full params on every rank (all-gathers under FSDP; every rank must call it)."""
        return fsdp.full_tree(params) if self.layout is not None else params

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(cfg: Config, device: torch.device) -> Parallel:
    """Join torchrun's group (if launched by it) and build the mesh of ``cfg.parallel``.

    Raises:
        ConfigError: degrees that do not fit the world, a batch that does not split over the
            ranks, or an option that does not combine with sharding.
    """
    p = cfg.parallel
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank, world, local = init_distributed(os.environ, device, p.backend, p.timeout_s)
    plan = plan_parallel(rank, world, local, p.dp_replicate, p.dp_shard, device.type)
    _validate(cfg, plan)
    return Parallel(plan=plan, device=device)


def with_layout(par: Parallel, cfg: Config, params: TensorDictBase) -> Parallel:
    """``par`` with the FSDP layout of ``params`` when the plan shards."""
    if not par.plan.sharded:
        return par
    assert par.plan.mesh is not None
    p = cfg.parallel
    layout = fsdp.FSDPLayout.of(
        params,
        par.plan.mesh,
        param_dtype=_DTYPES[p.param_dtype] if p.param_dtype else None,
        reduce_dtype=_DTYPES[p.reduce_dtype],
        reshard_after_forward=p.reshard_after_forward,
    )
    return attrs.evolve(par, layout=layout)


def _validate(cfg: Config, plan: ParallelPlan) -> None:
    world = plan.world_size
    per_rank, rest = divmod(cfg.data.batch_size, world)
    if rest or per_rank % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must split into {world} equal rank shares, "
            f"each a multiple of train.microbatches ({cfg.train.microbatches})"
        )
    if cfg.train.compile and world > 1:
        raise ConfigError("train.compile is not supported under torchrun yet; set it to false")
    if cfg.data.streaming and world > 1:
        raise ConfigError(
            "data.streaming does not shard over torchrun ranks yet; use map-style data"
        )
    if cfg.data.max_tokens is not None and world > 1:
        raise ConfigError("data.max_tokens (token-budget batches) does not support torchrun yet")
    if cfg.parallel.param_dtype is not None and cfg.loss.fused:
        raise ConfigError("parallel.param_dtype does not combine with loss.fused yet")
    if world > 1 and cfg.optimizer.type == "sophia_g":
        raise ConfigError(
            "optimizer.type=sophia_g is single-process only for now (its Hessian step is not "
            "reduced across ranks); choose another optimizer or run one process"
        )
    if plan.sharded:
        fsdp.check_optimizer(cfg.optimizer.type)
        if cfg.lora.enabled:
            raise ConfigError(
                "lora.enabled with parallel.dp_shard > 1: adapters are small, shard nothing; "
                "use parallel.dp_shard: 1 (DDP)"
            )
        if cfg.loss.fused:
            raise ConfigError("loss.fused does not combine with parallel.dp_shard > 1 yet")


def cast_apply(apply_fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> Callable:
    """Mixed precision without sharding: float params cast to ``dtype`` for the forward (the
    cast is differentiable, so gradients come back in the master dtype)."""

    def run(params: TensorDictBase, batch: Any, **kw: Any) -> torch.Tensor:
        cast = params.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        return apply_fn(cast, batch, **kw)

    return run


def wrap_step(
    par: Parallel,
    cfg: Config,
    model: Transformer,
    apply_fn: Callable[..., torch.Tensor],
    tx: GradientTransformation,
    build: Callable[..., StepFn],
) -> StepFn:
    """The step of the plan: ``build(apply_fn, grad_sync=..., grad_norm=...)`` makes the plain
    step (see ``builders.build_step``); DDP adds the all-reduce, FSDP the sharded apply and the
    DTensor state around it."""
    p = cfg.parallel
    reduce_dtype = _DTYPES[p.reduce_dtype]
    if par.layout is not None:
        sharded = fsdp.sharded_apply(model.apply, par.layout)
        group = None  # all ranks: the loss and token count are global sums
        step = build(
            sharded,
            grad_sync=fsdp.make_fsdp_sync(group),
            grad_norm=fsdp.sharded_norm(par.layout),
        )
        return fsdp.wrap_fsdp_step(step)
    if p.param_dtype is not None:
        apply_fn = cast_apply(apply_fn, _DTYPES[p.param_dtype])
    if par.world_size == 1:
        return build(apply_fn)
    sync = ddp.make_ddp_sync(None, bucket_mb=p.bucket_mb, reduce_dtype=reduce_dtype)
    return build(apply_fn, grad_sync=sync)
