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
from tensordict import TensorDict, TensorDictBase

from tscale.config.schema import Config
from tscale.core.state import TrainState
from tscale.errors import ConfigError
from tscale.models.lora import with_dropout_keys
from tscale.models.transformer import Transformer
from tscale.optim.base import GradientTransformation
from tscale.optim.transforms import MaskFn
from tscale.parallel import ddp, fsdp
from tscale.parallel.deepspeed_engine import DeepSpeedRun, deepspeed_config
from tscale.parallel.deepspeed_engine import initialize as deepspeed_initialize
from tscale.parallel.mesh import ParallelPlan, init_distributed, plan_parallel
from tscale.step.compose import StepFn

__all__ = ["Parallel", "StopVote", "cast_apply", "setup", "with_deepspeed"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class Parallel:
    """This process's place in the run and the layout of a sharded state (None unsharded)."""

    plan: ParallelPlan
    device: torch.device
    layout: fsdp.FSDPLayout | None = None
    deepspeed: DeepSpeedRun | None = None

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
        if self.deepspeed is not None:  # the engine owns params and optimizer state
            return TrainState.create(self.deepspeed.stored_params(), TensorDict(), rng)
        if self.layout is None:
            return TrainState.create(params, tx.init(params), rng)
        mesh = self.layout.mesh
        sharded = fsdp.shard_tree(params, mesh)
        opt_state = fsdp.shard_opt_state(tx.init(fsdp.local_tree(sharded)), sharded, mesh)
        return TrainState.create(sharded, opt_state, rng)

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


def _validate_deepspeed(cfg: Config) -> None:
    d, p = cfg.parallel.deepspeed, cfg.parallel
    if p.dp_shard != 1 or p.dp_replicate != -1:
        raise ConfigError(
            "parallel.dp_replicate / parallel.dp_shard do not apply with parallel.deepspeed."
            "enabled: DeepSpeed partitions over all ranks; choose parallel.deepspeed.zero_stage "
            "and leave them at their defaults (-1, 1)"
        )
    if cfg.optimizer.capabilities.needs_objective or cfg.optimizer.capabilities.eval_params:
        raise ConfigError(
            f"optimizer.type={cfg.optimizer.type} does not run under parallel.deepspeed "
            "(its Hessian step / averaged iterate lives outside DeepSpeed's optimizer step); "
            "use adamw, adamw_8bit or lion, or tscale's own parallelism"
        )
    if not cfg.optimizer.capabilities.elementwise:
        raise ConfigError(
            f"optimizer.type={cfg.optimizer.type} needs whole named tensors or sums over all "
            "params, but DeepSpeed hands the optimizer param groups (flat partitions under ZeRO); "
            "use adamw, adamw_8bit or lion, or tscale's own parallelism (parallel.deepspeed."
            "enabled: false)"
        )
    if d.zero_stage == 3 and (cfg.lora.enabled or cfg.loss.fused):
        raise ConfigError(
            "parallel.deepspeed.zero_stage: 3 does not combine with lora.enabled or loss.fused "
            "yet; use zero_stage 2"
        )
    if d.offload_param != "none" and d.zero_stage != 3:
        raise ConfigError("parallel.deepspeed.offload_param needs parallel.deepspeed.zero_stage: 3")
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        raise ConfigError(
            "parallel.deepspeed.offload_optimizer needs parallel.deepspeed.zero_stage >= 1"
        )
    if cfg.train.compile:
        raise ConfigError("train.compile does not combine with parallel.deepspeed; set it false")


def _validate_overlap(cfg: Config, plan: ParallelPlan) -> None:
    why = [
        reason
        for reason, bad in (
            ("parallel.dp_shard > 1 (FSDP reduces in its own backward)", plan.sharded),
            ("parallel.deepspeed.enabled", cfg.parallel.deepspeed.enabled),
            ("train.microbatches > 1", cfg.train.microbatches > 1),
            ("parallel.param_dtype", cfg.parallel.param_dtype is not None),
            (
                "parallel.reduce_dtype other than model.dtype",
                cfg.parallel.reduce_dtype != cfg.model.dtype,
            ),
            ("lora.enabled", cfg.lora.enabled),
            ("loss.fused", cfg.loss.fused),
        )
        if bad
    ]
    if why:
        raise ConfigError(
            f"parallel.overlap_reduce does not combine with {', '.join(why)}; set it false"
        )


def _validate(cfg: Config, plan: ParallelPlan) -> None:
    world = plan.world_size
    if cfg.parallel.deepspeed.enabled:
        _validate_deepspeed(cfg)
    per_rank, rest = divmod(cfg.data.batch_size, world)
    if rest or per_rank % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must split into {world} equal rank shares, "
            f"each a multiple of train.microbatches ({cfg.train.microbatches})"
        )
    if cfg.train.compile and world > 1:
        raise ConfigError("train.compile is not supported under torchrun yet; set it to false")
    if cfg.data.max_tokens is not None and world > 1:
        raise ConfigError("data.max_tokens (token-budget batches) does not support torchrun yet")
    if cfg.parallel.param_dtype is not None and cfg.loss.fused:
        raise ConfigError("parallel.param_dtype does not combine with loss.fused yet")
    if world > 1 and cfg.optimizer.capabilities.needs_objective:
        raise ConfigError(
            "optimizer.type=sophia_g is single-process only for now (its Hessian step is not "
            "reduced across ranks); choose another optimizer or run one process"
        )
    if cfg.parallel.overlap_reduce:
        _validate_overlap(cfg, plan)
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
    if par.deepspeed is not None:
        run, microbatches = par.deepspeed, cfg.train.microbatches

        def engine_step(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, dict]:
            return state.replace(step=state.step + 1), run.step(batch, microbatches)

        if cfg.lora.enabled and cfg.lora.dropout > 0:
            return with_dropout_keys(engine_step)
        return engine_step
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
    if p.overlap_reduce:  # each layer's all-reduce starts in the backward (validated above)
        overlapped = ddp.OverlappedDDP(None)
        return build(overlapped.apply(model.apply), grad_sync=overlapped.sync)
    sync = ddp.make_ddp_sync(None, bucket_mb=p.bucket_mb, reduce_dtype=reduce_dtype)
    return build(apply_fn, grad_sync=sync)
