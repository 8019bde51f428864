"""Assembly: ``build_run(cfg) -> Run``, everything the loop needs, built once from the config.

The config is read here (and in the builders it calls), never by the loop: the loop in
:mod:`tscale.train.trainer` only moves batches through ``run.step``, reads metrics, evaluates,
saves and calls the hooks. Reading order: device and ranks → run directory → data (the task's
example stage) → model and state → the task's loss → the step → evaluation and saving.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from rich.console import Console
from tensordict import TensorDict

from tscale import checkpoint as ckpt
from tscale.checkpoint.frozen import FrozenSource, tensors_fingerprint
from tscale.checkpoint.hf import from_pretrained
from tscale.checkpoint.reward import load_reward_model
from tscale.checkpoint.sharded import load_deepspeed, save_deepspeed, save_sharded
from tscale.config.load import to_yaml
from tscale.config.schema import Config, resolve_defaults, steps_for_epochs
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.data.loader import BatchLoader, with_logits_index
from tscale.errors import CheckpointError, ConfigError
from tscale.models.transformer import Transformer
from tscale.optim.base import GradientTransformation
from tscale.optim.schedules import Schedule
from tscale.step.compose import StepFn
from tscale.tasks.base import RolloutFn, StatefulRollout, Task, TaskContext
from tscale.tasks.reward import split_score
from tscale.train import builders, data_build, data_report, distributed, preflight
from tscale.train.callbacks import Callback, JsonlLogger, ProgressBar, truncate_jsonl
from tscale.train.export import export_adapter
from tscale.train.loggers import build_loggers, check_logger_packages

__all__ = ["Run", "build_run"]

MakeStep = Callable[[Transformer, GradientTransformation], StepFn]


@attrs.define(kw_only=True, eq=False)
class Run:
    """A built run: the state to start from and the functions the loop calls.

    Attributes:
        step: ``step(state, batch) -> (state, metrics)``, pure, wrapped for the parallel plan.
        rollout: the task's state-dependent batch stage (None: none), before the updates.
        batches: the training batches (the loader's iterator; its cursor is saved).
        prepare_batch: the host-side batch stage before ``step`` (e.g. ``logits_index``).
        evaluate: ``evaluate(state) -> (metrics, samples)``; a collective under sharding,
            ``({}, [])`` on ranks other than 0.
        save: ``save(state, step, extra) -> path`` (every rank calls it; None off rank 0).
        finish: called on rank 0 after the final save (e.g. the LoRA adapter export).
    """

    cfg: Config
    par: distributed.Parallel
    task: Task
    state: TrainState
    step: StepFn
    rollout: RolloutFn | None
    loader: Any
    batches: Iterator[TensorDict]
    prepare_batch: Callable[[TensorDict], TensorDict]
    schedule: Schedule
    data: Any
    evaluate: Callable[[TrainState], tuple[dict[str, float], list[dict[str, Any]]]]
    has_eval: bool
    save: Callable[[TrainState, int, dict[str, Any]], Path | None]
    finish: Callable[[TrainState], None]
    hooks: list[Callback]
    run_dir: Path
    pad_id: int
    resumed_from: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.par.is_main


def build_run(
    cfg: Config,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    console: Console | None = None,
    make_step: MakeStep | None = None,
) -> Run:
    """Build everything a run needs from ``cfg`` (see :func:`tscale.train.trainer.train` for
    the arguments); the state is restored from a checkpoint when resuming."""
    console = console or Console()
    cfg = resolve_defaults(cfg)  # null/auto keys: fine-tuning or random-init defaults
    builders.validate(cfg)
    preflight.check(cfg)  # input paths exist, output places writable: before any write
    check_logger_packages(cfg, cfg.run.output_dir)  # every rank: log.to's packages installed
    device = builders.resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # under torchrun: join the group; every rank runs this function, rank 0 writes the run files
    par = distributed.setup(cfg, device)
    device, main = par.device, par.is_main
    _check_custom_step(make_step, cfg, par)
    run_dir = Path(cfg.run.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if overwrite and resume is not False:
        raise CheckpointError("--overwrite and --resume exclude each other; choose one")
    # --overwrite deletes the old checkpoints only once the new run is built (below): a run that
    # stops on a config or data mistake leaves them as they were.
    resume_from = None if overwrite else _resume_path(resume, ckpt_root)
    config_yaml = to_yaml(cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)

    task: Task = cfg.task  # the objective: its record is the task (tscale/tasks)
    for r in range(par.world_size):  # one rank after the other: they share the data cache
        if r == par.plan.rank:
            bundle = data_build.build_data(  # records → the task's examples → batches
                cfg,
                run_dir,
                rank=par.plan.rank,
                world_size=par.world_size,
                make_examples=task.examples,
            )
        par.barrier()
    if main:  # every row accounted for, before the first step (docs/data.md#the-data-report)
        data_report.print_report(console, bundle.report)
        data_report.write_report(run_dir, bundle.report)
    if cfg.train.epochs is not None:  # train.epochs: the data decides train.max_steps
        cfg, config_yaml = _steps_from_epochs(cfg, bundle, run_dir, console, main)
    schedule = builders.build_schedule(cfg)

    # the model, the trained params and the frozen trees
    init_key, state_key = R.split(R.key(cfg.run.seed), 2)
    # a task whose model scores instead of predicting tokens (task.head "score": a reward model)
    scores = getattr(task, "head", "lm") == "score"
    model, params = builders.build_model(cfg, bundle.encoder.vocab_size, init_key, reward=scores)
    params = params.to(device)
    stacked: Any = model  # the model the trained params belong to (tscale.models.stack)
    frozen: dict[str, Any] = {}
    sources: dict[str, FrozenSource] = {}
    head = None
    if cfg.lora.enabled:  # the base is a frozen tree of the state; the adapters are trained
        if scores:  # the score head trains beside the adapters; the base is the decoder alone
            params, head = split_score(params)
        stacked, frozen["base"] = builders.build_lora_model(cfg, model, params)
        if cfg.model.path is not None:  # checkpoints record the folder, not a copy
            sources["base"] = FrozenSource.of(cfg.model.path)
        params = stacked.init(R.fold_in(init_key, 1), frozen=frozen)
    lora_config = getattr(stacked, "config", None)  # the adapters' hyper-parameters (LoRA)
    if scores:
        if cfg.parallel.deepspeed.enabled:
            raise ConfigError(f"task.type {task.type}: not available under parallel.deepspeed")
        params = params if head is None else T.combine(params, head)
        pad = None if bundle.encoder.pad_is_eos else bundle.encoder.pad_id
        stacked = task.wrap_model(stacked, model.config, pad_id=pad)  # type: ignore[attr-defined]
    if hasattr(task, "extend_model"):  # trainable trees beside the model's (PPO's value head)
        stacked, params = task.extend_model(
            stacked,
            params,
            model.config,
            key=R.fold_in(init_key, 2),
            read_reward=load_reward_model,
        )

    # The built-in losses read the labels at logits_index; a user's step gets the plain batch.
    prepare_batch = (
        with_logits_index if make_step is None and cfg.loss.trained_positions_only else _unchanged
    )
    ctx = TaskContext(
        model=stacked,
        apply_fn=stacked.apply,
        data=bundle,
        device=device,
        config=cfg,
        prepare_batch=prepare_batch,
        params=params,
        frozen=frozen,
        source=cfg.model.path,
        weights_fingerprint=partial(_weights_fingerprint, cfg.model.path),
        read_folder=partial(_read_folder, dtype=builders.param_dtype(cfg), device=device),
    )
    for name, added in task.prepare(ctx).items():  # e.g. a reference model, as frozen trees
        frozen[name] = added.tree
        if added.source is not None:  # checkpoints record the folder, not a copy
            sources[name] = FrozenSource.of(added.source)
    ctx = attrs.evolve(ctx, frozen=frozen, params=None)  # the state owns the params now

    par = distributed.with_layout(par, cfg, params, frozen)  # FSDP: of params, or the LoRA base
    bound = {"frozen": frozen} if frozen else {}  # DeepSpeed calls the loss without the state
    par = distributed.with_deepspeed(  # the engine of parallel.deepspeed (else unchanged)
        par,
        cfg,
        params,
        make_loss=lambda fn: task.loss(attrs.evolve(ctx, apply_fn=partial(fn, **bound))),
        model_apply=model.apply,
        apply_fn=stacked.apply,
        make_tx=lambda mask: builders.build_optimizer(cfg, schedule, mask=mask, clip=False),
        decays=builders.decay_mask(cfg),
    )
    tx = builders.build_optimizer(cfg, schedule, norm_fn=par.norm_fn())
    state = par.init_state(params, tx, state_key.to(device), frozen)
    del params
    frozen = {}  # the state holds the frozen trees now (sharded under FSDP)
    ctx = attrs.evolve(ctx, frozen=state.frozen)

    # what the task records in every checkpoint and checks on resume (online RL: the rewards'
    # fingerprints), JSON-able
    task_meta = task.checkpoint_meta(ctx) if hasattr(task, "checkpoint_meta") else {}
    engine = par.deepspeed
    engine_meta = {"world_size": par.world_size, "zero_stage": cfg.parallel.deepspeed.zero_stage}
    metrics_file = run_dir / "metrics.jsonl"
    loader = bundle.loader
    if resume_from is not None:
        if engine is not None:
            state, meta = load_deepspeed(
                resume_from, state, load_engine=engine.load, engine_meta=engine_meta
            )
        else:
            state, meta = ckpt.load_checkpoint(resume_from, state, sources)
        loader.load_state_dict(meta["cursor"])
        saved_task = meta.get("extra", {}).get("task")
        if task_meta and saved_task is not None:
            task.check_resume(saved_task, task_meta)  # raises naming what changed
        if main:
            truncate_jsonl(metrics_file, meta["step"])
            console.print(f"resumed from {resume_from} at step {meta['step']}", soft_wrap=True)
    elif main:
        if overwrite and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        metrics_file.unlink(missing_ok=True)
    par.barrier()

    rollout = task.rollout(ctx)  # e.g. generations from the current policy
    # the host-side state a rollout carries between batches (online RL: the rewards' failure
    # window), one entry per rank in every checkpoint, restored like the data cursor
    rollout_state = rollout if isinstance(rollout, StatefulRollout) else None
    if resume_from is not None and rollout_state is not None:
        _restore_rollout(rollout_state, meta.get("extra", {}).get("rollout"), par)
    if make_step is not None:  # a user's step: the model the params belong to, the optimizer
        step_fn = make_step(stacked, tx)
    elif par.deepspeed is not None:  # DeepSpeed's engine takes the step
        step_fn = distributed.engine_step(par, cfg)
    else:  # the task's loss over the plan's model, in make_train_step, wrapped for the plan
        plan = distributed.step_plan(par, cfg, stacked)
        loss_fn = task.loss(attrs.evolve(ctx, model=plan.model, apply_fn=plan.model.apply))
        step_fn = plan.wrap(
            builders.build_step(
                cfg,
                loss_fn,
                tx,
                apply_fn=plan.model.apply,
                rank=par.plan.rank,
                world_size=par.world_size,
                **plan.reductions,
            )
        )

    eval_params = builders.build_eval_params(cfg)

    def evaluate(st: TrainState) -> tuple[dict[str, float], list[dict[str, Any]]]:
        full = par.full_params(eval_params(st))  # collectives under FSDP
        frozen_full = par.full_frozen(st.frozen)
        return task.evaluate(ctx, full, frozen_full or None) if main else ({}, [])

    has_eval = task.has_eval(bundle, cfg)  # the task says what it can evaluate

    def save(st: TrainState, at: int, extra: dict[str, Any]) -> Path | None:
        files = dict(bundle.tokenizer_files)  # the run's HF tokenizer folder, flat
        if task_meta:
            extra = {**extra, "task": task_meta}
        if rollout_state is not None:  # a collective: every rank saves
            extra = {**extra, "rollout": par.gather_objects(rollout_state.state_dict())}
        cursor = loader.state_dict()
        collective = dict(  # the multi-rank savers: every rank calls them
            step=at,
            is_main=main,
            barrier=par.barrier,
            cursor=cursor,
            extra=extra,
            config_yaml=config_yaml,
            files=files,
        )
        path: Path | None = None
        if engine is not None:  # every rank writes its ZeRO partitions, rank 0 the params
            path = save_deepspeed(
                ckpt_root,
                st,
                engine.full_params(),
                write_engine=engine.save,
                engine_meta=engine_meta,
                **collective,
            )
        elif par.layout is not None:  # every rank writes its shards (DCP)
            path = save_sharded(ckpt_root, st, **collective)
        elif main:
            path = ckpt.save_checkpoint(
                ckpt_root,
                st,
                step=at,
                cursor=cursor,
                config_yaml=config_yaml,
                files=files,
                extra=extra,
                frozen_sources=sources,
            )
        if main:
            ckpt.prune_checkpoints(ckpt_root, cfg.train.keep_last)
        par.barrier()
        return Path(path) if main and path is not None else None

    def finish(st: TrainState) -> None:
        # a PEFT adapter directory that `peft` loads (a reward model: `tscale export` merges)
        if cfg.lora.enabled and main and not scores:
            exported = getattr(task, "export_params", None)  # PPO: the value head stays out
            export_adapter(
                st.params if exported is None else exported(st.params),
                lora_config,
                run_dir / "adapter",
                checkpoint_dir=ckpt.latest_checkpoint(ckpt_root),
                base_model=cfg.model.path,
            )

    hooks: list[Callback] = []
    if main:  # rank 0 reports for the run; the other ranks only compute
        hooks = [
            ProgressBar.for_run(console, cfg, loader),
            JsonlLogger(metrics_file),
            *build_loggers(cfg, run_dir, console=console, resumed_from=resume_from),
            *(task.callbacks(ctx) if hasattr(task, "callbacks") else ()),  # the task's own
            *callbacks,
        ]
    return Run(
        cfg=cfg,
        par=par,
        task=task,
        state=state,
        step=step_fn,
        rollout=rollout,
        loader=loader,
        batches=iter(loader),
        prepare_batch=prepare_batch,
        schedule=schedule,
        data=bundle,
        evaluate=evaluate,
        has_eval=has_eval,
        save=save,
        finish=finish,
        hooks=hooks,
        run_dir=run_dir,
        pad_id=bundle.encoder.pad_id,
        resumed_from=resume_from,
    )


def _weights_fingerprint(path: str | None, tree: Any) -> str:
    """The starting weights' content fingerprint: their folder's, else their tensors'."""
    if path is not None:
        return "folder:" + FrozenSource.of(path).fingerprint
    return "tensors:" + tensors_fingerprint(tree)


def _read_folder(path: str, *, dtype: torch.dtype, device: torch.device) -> tuple[Any, str]:
    """Another HF causal-LM folder's params (the run's dtype and device) and its fingerprint."""
    return from_pretrained(path, dtype=dtype).params.to(device), _weights_fingerprint(path, None)


def _unchanged(batch: TensorDict) -> TensorDict:
    return batch


def _check_custom_step(make_step: MakeStep | None, cfg: Config, par: Any) -> None:
    if make_step is not None and cfg.parallel.deepspeed.enabled:
        raise ConfigError(
            "make_step= builds a tscale step; parallel.deepspeed runs DeepSpeed's engine step "
            "instead: leave one of them out"
        )
    if make_step is not None and cfg.train.microbatches > 1:
        raise ConfigError(
            f"train.microbatches ({cfg.train.microbatches}) splits the built-in step's batch; "
            "make_step= builds its own step: accumulate inside it (tscale.step.make_train_step("
            "loss_fn, tx, microbatches=k)), or write a task instead (docs/tasks.md), whose loss "
            "gets train.microbatches from the trainer"
        )
    if par.world_size > 1 and make_step is not None:
        raise ConfigError(
            "make_step= builds a single-process step; under torchrun use the built-in step, or "
            "call make_train_step(..., grad_sync=tscale.parallel.make_ddp_sync(None)) yourself"
        )


def _steps_from_epochs(
    cfg: Config, bundle: Any, run_dir: Path, console: Console, main: bool
) -> tuple[Config, str]:
    """``cfg`` with ``train.max_steps`` from ``train.epochs`` and the loader's steps per epoch
    (the first epoch's with ``data.max_tokens``), checked; rank 0 prints the figures and writes
    the run's config.yaml again. Returns the config and its YAML."""
    loader = bundle.loader
    if not isinstance(loader, BatchLoader):  # builders.validate refuses streaming + epochs
        raise ConfigError(
            "train.epochs needs the data's size; with data.streaming set train.max_steps"
        )
    per_epoch = loader.num_batches_per_epoch
    steps = steps_for_epochs(cfg, per_epoch)
    t = cfg.train
    resolved = attrs.evolve(cfg, train=attrs.evolve(t, max_steps=steps))
    builders.validate_steps(resolved)
    config_yaml = to_yaml(resolved)
    if main:
        capped = t.max_steps is not None and steps < (t.epochs or 0) * per_epoch
        console.print(
            f"train.epochs {t.epochs:g}: {per_epoch} steps per epoch ({loader.num_examples} "
            f"examples, data.batch_size {cfg.data.batch_size}) -> {steps} steps"
            + (f" (train.max_steps {t.max_steps} comes first)" if capped else ""),
            soft_wrap=True,
        )
        (run_dir / "config.yaml").write_text(config_yaml)
    return resolved, config_yaml


def _restore_rollout(rollout: StatefulRollout, saved: Any, par: distributed.Parallel) -> None:
    """Give each rank its rollout state from the checkpoint (``extra.rollout``, one entry per
    rank; a changed world size: rank r takes entry r modulo the saved ranks). A checkpoint
    written before rollouts saved state has none: the state starts afresh."""
    if not saved:
        return
    rollout.load_state_dict(saved[par.plan.rank % len(saved)])


def _resume_path(resume: bool | str | Path, ckpt_root: Path) -> Path | None:
    if resume is False:
        if ckpt.list_checkpoints(ckpt_root):
            raise CheckpointError(
                f"{ckpt_root.parent} already holds checkpoints; pass --resume to continue that "
                "run, --overwrite to start it again, or choose another run.output_dir"
            )
        return None
    if resume is True:
        found = ckpt.latest_checkpoint(ckpt_root)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint under {ckpt_root}")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"--resume {path}: not a checkpoint directory (no state.json)")
    return path
