"""The trainer's side of data parallelism: the plan from ``parallel:`` and torchrun, the
wrapped step, the sharded state, and the collectives the loop itself needs.

Everything numeric lives in :mod:`tscale.parallel`; this module only assembles it from the
config (configs stop at the builders).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase

from tscale.config import rules
from tscale.config.schema import Config
from tscale.core.state import TrainState
from tscale.errors import ConfigError
from tscale.models.lora import with_dropout_keys
from tscale.models.protocol import BASE
from tscale.models.stack import CastModel
from tscale.optim.base import GradientTransformation
from tscale.optim.transforms import MaskFn
from tscale.parallel import ddp, fsdp
from tscale.parallel.deepspeed_engine import DeepSpeedRun, deepspeed_config
from tscale.parallel.deepspeed_engine import initialize as deepspeed_initialize
from tscale.parallel.mesh import ParallelPlan, init_distributed, plan_parallel
from tscale.step.compose import StepFn

__all__ = [
    "Parallel",
    "StepPlan",
    "StopVote",
    "engine_step",
    "setup",
    "step_plan",
    "with_deepspeed",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class Parallel:
    """This process's place in the run and the layout of a sharded state (None unsharded)."""

    plan: ParallelPlan
    device: torch.device
    layout: fsdp.FSDPLayout | None = None
    deepspeed: DeepSpeedRun | None = None
    base_layout: fsdp.FSDPLayout | None = None
    """LoRA under FSDP: the layout of the frozen base (``frozen["base"]``), sharded like params
    would be; the adapters (the trained params) stay replicated, reduced as under DDP."""

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

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` alone)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def norm_fn(self) -> Callable[..., torch.Tensor] | None:
        """The clip norm of a sharded optimizer (None: the plain global norm)."""
        return fsdp.sharded_norm(self.layout) if self.layout is not None else None

    def init_state(
        self,
        params: TensorDictBase,
        tx: GradientTransformation,
        rng: torch.Tensor,
        frozen: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """The step-0 state: sharded DTensors under FSDP (each rank keeps its rows of the
        same full init), the plain state otherwise; ``frozen`` trees as given."""
        if self.deepspeed is not None:  # the engine owns params and optimizer state
            return TrainState.create(self.deepspeed.stored_params(), TensorDict(), rng, frozen)
        if self.base_layout is not None and frozen is not None:  # each rank keeps its rows
            frozen = {**frozen, BASE: fsdp.shard_tree(frozen[BASE], self.base_layout.mesh)}
        if self.layout is None:
            return TrainState.create(params, tx.init(params), rng, frozen)
        mesh = self.layout.mesh
        sharded = fsdp.shard_tree(params, mesh)
        opt_state = fsdp.shard_opt_state(tx.init(fsdp.local_tree(sharded)), sharded, mesh)
        return TrainState.create(sharded, opt_state, rng, frozen)

    def full_frozen(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The frozen trees whole on every rank (all-gathers a sharded base; every rank must
        call it)."""
        if self.base_layout is None:
            return dict(frozen)
        return {**frozen, BASE: fsdp.full_tree(frozen[BASE])}

    def full_params(self, params: TensorDictBase) -> TensorDictBase:
        """Full params on every rank (all-gathers under FSDP and DeepSpeed ZeRO; every rank
        must call it)."""
        if self.deepspeed is not None:
            return self.deepspeed.full_params()
        return fsdp.full_tree(params) if self.layout is not None else params

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopVote:
    """All ranks agree on the step at which a stop request (a signal) ends the run, with no host
    sync inside a step.

    After each step every rank calls :meth:`poll` with its own flag: it waits for the vote it
    started after the previous step (an all-reduce that ran beside this step's compute on a
    gloo group of its own) and starts the next one. Every rank gets the same answer at the same
    step, so a request made during step k stops every rank after step k + 1 (one process: after
    step k). :meth:`close` settles the last vote with one blocking all-reduce.
    """

    def __init__(self, par: Parallel) -> None:
        self.world_size = par.world_size
        self._group: Any = None
        self._work: Any = None
        self._flag: torch.Tensor | None = None
        if self.world_size > 1:  # the vote's own CPU group: never queued behind NCCL work
            self._group = dist.new_group(backend="gloo")

    def poll(self, local: bool) -> bool:
        """True when some rank asked to stop by the previous poll (every rank gets the same)."""
        if self.world_size == 1:
            return local
        agreed = self._wait()
        self._flag = torch.tensor([1.0 if local else 0.0])
        self._work = dist.all_reduce(self._flag, group=self._group, async_op=True)
        return agreed

    def close(self, local: bool) -> bool:
        """Settle: True when any rank asked to stop (by now); every rank must call it."""
        if self.world_size == 1:
            return local
        self._wait()
        flag = torch.tensor([1.0 if local else 0.0])
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item())

    def _wait(self) -> bool:
        if self._work is None or self._flag is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._flag.item())


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


def with_layout(
    par: Parallel, cfg: Config, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
) -> Parallel:
    """``par`` with the FSDP layout of ``params`` when the plan shards — or, with LoRA, of the
    frozen base (``frozen["base"]``): the base is what is large, the adapters stay whole."""
    if not par.plan.sharded:
        return par
    assert par.plan.mesh is not None
    p = cfg.parallel
    lora_base = frozen is not None and BASE in frozen
    layout = fsdp.FSDPLayout.of(
        frozen[BASE] if lora_base else params,  # type: ignore[index]
        par.plan.mesh,
        param_dtype=_DTYPES[p.param_dtype] if p.param_dtype else None,
        reduce_dtype=_DTYPES[p.reduce_dtype],
        reshard_after_forward=p.reshard_after_forward,
    )
    return attrs.evolve(par, base_layout=layout) if lora_base else attrs.evolve(par, layout=layout)


def with_deepspeed(
    par: Parallel,
    cfg: Config,
    params: TensorDictBase,
    *,
    make_loss: Callable[[Callable[..., torch.Tensor]], Callable],
    model_apply: Callable[..., torch.Tensor],
    apply_fn: Callable[..., torch.Tensor],
    make_tx: Callable[[MaskFn | None], GradientTransformation],
    decays: MaskFn | None,
) -> Parallel:
    """``par`` with a DeepSpeed engine over ``params`` when ``parallel.deepspeed.enabled``.

    ``make_loss(apply) -> loss_fn`` builds the configured loss over an apply function (ZeRO-3
    passes ``model_apply`` with the engine's per-layer gather); ``make_tx(mask)`` the configured
    optimizer without clipping (``mask`` None: every param decays).

    Raises:
        ConfigError: ``parallel.deepspeed.config`` sets a key tscale derives.
    """
    d = cfg.parallel.deepspeed
    if not d.enabled:
        return par
    bf16 = cfg.parallel.param_dtype == "bfloat16" or cfg.model.dtype == "bfloat16"
    try:
        conf = deepspeed_config(
            global_batch=cfg.data.batch_size,
            world_size=par.world_size,
            microbatches=cfg.train.microbatches,
            zero_stage=d.zero_stage,
            max_grad_norm=cfg.optimizer.max_grad_norm,
            bf16=bf16,
            reduce_dtype=_DTYPES[cfg.parallel.reduce_dtype],
            offload_optimizer=d.offload_optimizer,
            offload_param=d.offload_param,
            extra=d.config,
        )
    except ValueError as err:
        raise ConfigError(f"parallel.deepspeed.{err}") from None

    def loss_over(gather: Callable | None) -> Callable:
        if gather is None:
            return make_loss(apply_fn)
        return make_loss(lambda p, batch, **kw: model_apply(p, batch, gather=gather, **kw))

    never: MaskFn = lambda name, t: False  # noqa: E731 - the no-decay group's mask
    try:
        run = deepspeed_initialize(
            params,
            make_loss=loss_over,
            make_tx=lambda decay: make_tx(None if decay else never),
            decays=decays,
            config=conf,
            device=par.device,
            skip_nonfinite=cfg.optimizer.skip_nonfinite,
        )
    except ImportError as err:
        raise ConfigError(str(err)) from None
    return attrs.evolve(par, deepspeed=run)


def _validate(cfg: Config, plan: ParallelPlan) -> None:
    """The config's rules for this plan (:func:`tscale.config.rules.check_parallel`)."""
    rules.check_parallel(cfg, plan.world_size, sharded=plan.sharded)


@attrs.frozen(kw_only=True)
class StepPlan:
    """How the parallel plan shapes the step: the model the loss runs (the stack wrapped for the
    plan: sharded, overlapped or cast), the reductions the step calls, and a wrapper around the
    built step (FSDP: a state of DTensors in and out). One process: the model as given."""

    model: Any
    reductions: dict[str, Any] = attrs.field(factory=dict)
    """``grad_sync`` / ``grad_norm`` / ``metric_sync`` for ``make_train_step``."""
    wrap: Callable[[StepFn], StepFn] = lambda step: step


def step_plan(par: Parallel, cfg: Config, model: Any) -> StepPlan:
    """The :class:`StepPlan` of ``par`` around ``model`` (a :mod:`tscale.models.protocol`
    stack): FSDP gathers each layer (``ShardedModel``) and steps on DTensors, DDP all-reduces
    the gradients (overlapped: ``OverlappedModel`` starts each layer's in the backward), and
    ``parallel.param_dtype`` casts the params for the compute (``CastModel``)."""
    p = cfg.parallel
    if par.base_layout is not None:  # LoRA over a sharded base: the adapters reduced as DDP
        sync = ddp.make_ddp_sync(None, bucket_mb=p.bucket_mb, reduce_dtype=_DTYPES[p.reduce_dtype])
        return StepPlan(
            model=fsdp.ShardedModel(model, par.base_layout, tree=BASE),
            reductions=dict(grad_sync=sync, metric_sync=ddp.make_metric_sync(None)),
            wrap=fsdp.wrap_local_frozen,
        )
    if par.layout is not None:
        group = None  # all ranks: the loss and token count are global sums
        return StepPlan(
            model=fsdp.ShardedModel(model, par.layout),
            reductions=dict(
                grad_sync=fsdp.make_fsdp_sync(group),
                grad_norm=fsdp.sharded_norm(par.layout),
                metric_sync=ddp.make_metric_sync(group),
            ),
            wrap=fsdp.wrap_fsdp_step,
        )
    if p.param_dtype is not None:
        model = CastModel(model, _DTYPES[p.param_dtype])
    if par.world_size == 1:
        return StepPlan(model=model)
    if p.overlap_reduce:  # each layer's all-reduce starts in the backward (validated above)
        overlapped = ddp.OverlappedDDP(None)
        return StepPlan(
            model=overlapped.wrap(model),
            reductions=dict(grad_sync=overlapped.sync, metric_sync=ddp.make_metric_sync(None)),
        )
    sync = ddp.make_ddp_sync(None, bucket_mb=p.bucket_mb, reduce_dtype=_DTYPES[p.reduce_dtype])
    return StepPlan(
        model=model, reductions=dict(grad_sync=sync, metric_sync=ddp.make_metric_sync(None))
    )


def engine_step(par: Parallel, cfg: Config) -> StepFn:
    """The step of ``parallel.deepspeed``: DeepSpeed's engine takes the optimizer step; the
    state only counts steps (and carries the rng for LoRA dropout keys)."""
    run, microbatches = par.deepspeed, cfg.train.microbatches
    assert run is not None

    def step(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, dict]:
        return state.replace(step=state.step + 1), run.step(batch, microbatches)

    if cfg.lora.enabled and cfg.lora.dropout > 0:
        return with_dropout_keys(step)
    return step
