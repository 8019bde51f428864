"""The one impure loop: data → step → callbacks → checkpoint.

Everything numeric happens in pure functions built by :mod:`tscale.train.builders`; this module
moves batches, reads metrics every ``log_every`` steps (the only host syncs), evaluates, saves and
resumes.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tensordict import TensorDict, TensorDictBase

from tscale import checkpoint as ckpt
from tscale.checkpoint.sharded import load_deepspeed, save_deepspeed, save_sharded
from tscale.config.load import to_yaml
from tscale.config.schema import Config, resolve_defaults, steps_for_epochs
from tscale.core import rng as R
from tscale.core.state import TrainState
from tscale.data.loader import BatchLoader, batch_iter, with_logits_index
from tscale.errors import CheckpointError, ConfigError
from tscale.losses.lm import make_lm_loss
from tscale.models.generate import greedy
from tscale.models.transformer import Transformer
from tscale.optim.base import GradientTransformation
from tscale.step.compose import StepFn, make_eval_step
from tscale.train import builders, data_report, distributed
from tscale.train.callbacks import Callback, JsonlLogger, ProgressBar, truncate_jsonl
from tscale.train.export import export_adapter
from tscale.train.loggers import build_loggers
from tscale.train.signals import StopSignals


@attrs.frozen(kw_only=True)
class TrainResult:
    """What a finished run returns (and prints as its summary)."""

    run_dir: Path
    final_step: int
    state: TrainState
    summary: dict[str, Any]


def evaluate(
    apply_fn,
    params: TensorDictBase,
    bundle: builders.DataBundle,
    *,
    num_samples: int,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    prepare_batch: Callable[[TensorDict], TensorDict] = lambda batch: batch,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out loss and perplexity over all eval examples, and exact match of greedy answers
    on the first ``num_samples`` eval records that carry a reference answer (overall, and per
    ``task`` when records carry one); returns ``(metrics, samples)``. No eval data: ``({}, [])``.

    Each sample's ``prompt`` is the decoded generation prompt, i.e. the record as the template
    (``bundle.encode_prompt``) gave it to the model."""
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    if bundle.eval_examples:
        eval_step = make_eval_step(make_lm_loss(apply_fn))
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.int64)
        for batch in batch_iter(bundle.eval_examples, batch_size, bundle.encoder.pad_id):
            out = eval_step(params, prepare_batch(batch).to(device))
            loss_sum += out["loss_sum"].double().cpu()
            tokens += out["tokens"].cpu()
        metrics["loss"] = float(loss_sum / tokens.clamp_min(1))
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))  # finite in float64
    answerable = [r for r in bundle.eval_records if reference_answer(r) is not None]
    records = answerable[:num_samples] if num_samples > 0 else []
    if records:
        enc = bundle.encoder
        correct = 0
        by_task: dict[str, list[bool]] = {}
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [bundle.encode_prompt(r) for r in chunk]
            outs = greedy(
                apply_fn,
                params,
                prompts,
                max_new_tokens=max_new_tokens,
                eos_id=enc.eos_id,
                pad_id=enc.pad_id,
                device=device,
            )
            for r, prompt, out in zip(chunk, prompts, outs, strict=True):
                answer = enc.decode(out)
                expected = reference_answer(r) or ""
                ok = answer.strip() == expected.strip()
                correct += ok
                if "task" in r:
                    by_task.setdefault(str(r["task"]), []).append(ok)
                shown = prompt[1:] if prompt[:1] == [enc.bos_id] else prompt
                samples.append(
                    {
                        "prompt": enc.tokenizer.decode(shown, skip_special_tokens=False),
                        "expected": expected,
                        "answer": answer,
                        "correct": ok,
                    }
                )
        metrics["exact_match"] = correct / len(records)
        for task, oks in sorted(by_task.items()):
            metrics[f"exact_match/{task}"] = sum(oks) / len(oks)
    return metrics, samples


def reference_answer(record: dict) -> str | None:
    """The reference answer of an eval record (``completion``, alpaca ``output``, or a chat's
    final turn when it is the assistant's), None when it has none to compare with."""
    # a file mixing formats gives every record every column, None where it has none
    if record.get("completion") is not None or record.get("output") is not None:
        return builders.question_and_answer(record)[1]
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return None
    role = turns[-1].get("role", turns[-1].get("from"))
    if role not in ("assistant", "gpt", "model", "bot"):
        return None
    return builders.question_and_answer(record)[1]


class _Stopper:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> None:
        self.requested = True


def train(
    cfg: Config,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    console: Console | None = None,
    make_step: Callable[[Transformer, GradientTransformation], StepFn] | None = None,
) -> TrainResult:
    """Run training as ``cfg`` says.

    Args:
        cfg: the resolved config.
        resume: False to start fresh (an existing run directory with checkpoints is an error),
            True to continue from the newest checkpoint of the run directory, or a checkpoint path.
        overwrite: start fresh in a run directory that holds checkpoints, deleting them.
        callbacks: extra callbacks after the built-in progress bar and JSONL logger.
        console: where to print (default: a new rich console).
        make_step: build your own ``step(state, batch) -> (state, metrics)`` from the model and
            the optimizer (default: ``make_train_step`` with the LM loss and the config's
            ``train.microbatches`` / ``train.donate``). Metrics must include ``loss``.
    """
    t_start = time.perf_counter()
    console = console or Console()
    cfg = resolve_defaults(cfg)  # null/auto keys: fine-tuning or random-init defaults
    builders.validate(cfg)
    device = builders.resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # under torchrun: join the group; every rank runs this function, rank 0 writes the run files
    par = distributed.setup(cfg, device)
    device, main = par.device, par.is_main
    if make_step is not None and cfg.parallel.deepspeed.enabled:
        raise ConfigError(
            "make_step= builds a tscale step; parallel.deepspeed runs DeepSpeed's engine step "
            "instead: leave one of them out"
        )
    if par.world_size > 1 and make_step is not None:
        raise ConfigError(
            "make_step= builds a single-process step; under torchrun use the built-in step, or "
            "call make_train_step(..., grad_sync=tscale.parallel.make_ddp_sync(None)) yourself"
        )
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

    for r in range(par.world_size):  # one rank after the other: they share the data cache
        if r == par.plan.rank:
            bundle = builders.build_data(
                cfg, run_dir, rank=par.plan.rank, world_size=par.world_size
            )
        par.barrier()
    if main:  # every row accounted for, before the first step (docs/data.md#the-data-report)
        data_report.print_report(console, bundle.report)
        data_report.write_report(run_dir, bundle.report)
    if cfg.train.epochs is not None:  # train.epochs: the data decides train.max_steps
        cfg, config_yaml = _steps_from_epochs(cfg, bundle, run_dir, console, main)
    schedule = builders.build_schedule(cfg)
    key = R.key(cfg.run.seed)
    init_key, state_key = R.split(key, 2)
    model, params = builders.build_model(cfg, bundle.encoder.vocab_size, init_key)
    params = params.to(device)
    apply_fn = model.apply
    lora_model = None
    if cfg.lora.enabled:  # the base is frozen; the adapters are the trained params
        lora_model = builders.build_lora_model(cfg, model, params)
        apply_fn = lora_model.apply
        params = lora_model.init(R.fold_in(init_key, 1))
    par = distributed.with_layout(par, cfg, params)
    par = distributed.with_deepspeed(  # the engine of parallel.deepspeed (else unchanged)
        par,
        cfg,
        params,
        make_loss=lambda fn: builders.build_loss(cfg, model, fn),
        model_apply=model.apply,
        apply_fn=apply_fn,
        make_tx=lambda mask: builders.build_optimizer(cfg, schedule, mask=mask, clip=False),
        decays=builders.decay_mask(cfg),
    )
    tx = builders.build_optimizer(cfg, schedule, norm_fn=par.norm_fn())
    state = par.init_state(params, tx, state_key.to(device))
    del params
    loader = bundle.loader
    metrics_file = run_dir / "metrics.jsonl"
    engine = par.deepspeed
    engine_meta = {
        "world_size": par.world_size,
        "zero_stage": cfg.parallel.deepspeed.zero_stage,
    }
    if resume_from is not None:
        if engine is not None:
            state, meta = load_deepspeed(
                resume_from, state, load_engine=engine.load, engine_meta=engine_meta
            )
        else:
            state, meta = ckpt.load_checkpoint(resume_from, state)
        loader.load_state_dict(meta["cursor"])
        if main:
            truncate_jsonl(metrics_file, meta["step"])
            console.print(f"resumed from {resume_from} at step {meta['step']}", soft_wrap=True)
    elif main:
        if overwrite and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        metrics_file.unlink(missing_ok=True)
    par.barrier()

    # The built-in losses read the labels at logits_index; a user's step gets the plain batch.
    prepare_batch = (
        with_logits_index
        if make_step is None and cfg.loss.trained_positions_only
        else lambda batch: batch
    )
    if make_step is not None:  # a user's step: called with the model and the optimizer
        step_fn = make_step(model, tx)
    else:
        step_fn = distributed.wrap_step(
            par,
            cfg,
            model,
            apply_fn,
            tx,
            lambda fn, **kw: builders.build_step(cfg, model, fn, tx, **kw),
        )
    eval_params = builders.build_eval_params(cfg)
    stop = _Stopper()
    hooks: list[Callback] = []
    if main:  # rank 0 reports for the run; the other ranks only compute
        hooks = [
            ProgressBar.for_run(console, cfg, bundle.loader),
            JsonlLogger(metrics_file),
            *build_loggers(cfg, run_dir, console=console, resumed_from=resume_from),
            *callbacks,
        ]

    def emit(name: str, **info: Any) -> None:
        info.setdefault("max_steps", cfg.train.max_steps)
        info["stop"] = stop
        for cb in hooks:
            getattr(cb, name)(info)

    def run_eval() -> tuple[dict[str, float], list[dict[str, str]]]:
        full = par.full_params(eval_params(state))  # a collective under FSDP
        if not main:
            return {}, []
        return evaluate(apply_fn, full, bundle, **ev)

    step = int(state.step)
    start_step = step
    # held-out loss needs eval examples; exact match, records with a reference answer
    has_eval = bool(bundle.eval_examples) or (
        cfg.eval.num_samples > 0
        and any(reference_answer(r) is not None for r in bundle.eval_records)
    )
    ev = dict(
        num_samples=cfg.eval.num_samples,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        prepare_batch=prepare_batch,
        device=device,
    )
    emit("on_train_start", step=step)
    pending: list[tuple[int, dict[str, torch.Tensor], int]] = []
    paused = 0.0  # seconds spent in eval and checkpointing, excluded from training time
    loop_t0 = window_t0 = time.perf_counter()
    window_paused, window_tokens, train_tokens = 0.0, 0, 0
    last_eval: dict[str, float] = {}
    samples: list[dict[str, str]] = []
    batches = iter(loader)
    pad_id = bundle.encoder.pad_id
    saved_to: list[Path] = []  # rank 0: the checkpoint the last save wrote

    def save(at: int) -> None:
        files = dict(bundle.tokenizer_files)  # the run's HF tokenizer folder, flat
        extra = {"eval": last_eval}
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
        if engine is not None:  # every rank writes its ZeRO partitions, rank 0 the params
            path = save_deepspeed(
                ckpt_root,
                state,
                engine.full_params(),
                write_engine=engine.save,
                engine_meta=engine_meta,
                **collective,
            )
        elif par.layout is not None:  # every rank writes its shards (DCP)
            path = save_sharded(ckpt_root, state, **collective)
        elif main:
            path = ckpt.save_checkpoint(
                ckpt_root,
                state,
                step=at,
                cursor=cursor,
                config_yaml=config_yaml,
                files=files,
                extra=extra,
            )
        if main:
            ckpt.prune_checkpoints(ckpt_root, cfg.train.keep_last)
            saved_to[:] = [Path(path)]
        par.barrier()

    def flush() -> None:
        nonlocal pending, window_t0, window_paused, window_tokens, train_tokens
        # all ranks: the run's tokens (each step's and the window's), and a stop a rank-0
        # callback asked for at the last flush
        sums = par.sum_over_ranks(
            [float(window_tokens), float(stop.requested), *(float(n) for _, _, n in pending)]
        )
        total, stops = sums[0], sums[1]
        rows = [  # the host sync
            _row(s, m, schedule, int(n)) for (s, m, _), n in zip(pending, sums[2:], strict=True)
        ]
        elapsed = time.perf_counter() - window_t0 - window_paused
        window_tokens = int(total)
        if stops:
            stop.requested = True
        train_tokens += window_tokens
        emit("on_step_end", step=step, rows=rows, tokens_per_s=window_tokens / max(elapsed, 1e-9))
        pending, window_t0, window_paused, window_tokens = [], time.perf_counter(), 0.0, 0

    def save_timed(at: int) -> tuple[float, Path | None]:
        """``save`` (every rank) and its wall time; rank 0 reports it (``on_save``)."""
        t0 = time.perf_counter()
        save(at)
        seconds = time.perf_counter() - t0
        path = saved_to[0] if saved_to else None
        if main:
            emit("on_save", step=at, path=str(path), seconds=seconds)
        return seconds, path

    signals = StopSignals()
    vote = distributed.StopVote(par)  # ranks agree on the step a signal stops the run at
    preempted = False
    max_steps = cfg.train.max_steps
    assert max_steps is not None  # resolved above
    if not has_eval and main:
        why = "gave no usable record" if cfg.data.eval_files else "is empty"
        console.print(
            f"no held-out data (data.eval_files {why}): no evaluation; list held-out files "
            "under data.eval_files to get eval loss and perplexity",
            soft_wrap=True,
        )
    with signals:  # SIGTERM/SIGINT: finish the step, save, return (restored on the way out)
        try:
            while step < max_steps and not stop.requested:
                batch = prepare_batch(next(batches))
                n_tokens = int((batch["input_ids"] != pad_id).sum())
                state, metrics = step_fn(state, batch.to(device, non_blocking=True))
                step += 1
                preempted = vote.poll(signals.requested is not None)
                pending.append((step, metrics, n_tokens))
                window_tokens += n_tokens
                last = step == max_steps or preempted
                if step % cfg.train.log_every == 0 or last:
                    flush()
                if preempted:
                    break
                t_pause = time.perf_counter()
                evaluate_now = cfg.train.eval_every and step % cfg.train.eval_every == 0
                if evaluate_now and has_eval and not last:
                    last_eval, samples = run_eval()
                    emit("on_eval", step=step, eval=last_eval, samples=samples)
                if cfg.train.save_every and step % cfg.train.save_every == 0 and not last:
                    save_timed(step)
                dt = time.perf_counter() - t_pause
                paused += dt
                window_paused += dt
            if pending:
                flush()
            # a signal during the last steps or a callback's stop: every rank decides the same
            preempted = vote.close(signals.requested is not None)
        except BaseException:
            emit("on_train_end", step=step, summary={"interrupted": True})
            raise
        train_time = time.perf_counter() - loop_t0 - paused

        if preempted:  # within the launcher's grace period: no final eval, save at once
            stopped_by = signals.requested or "a signal on another rank"
            if main:
                console.print(
                    f"{stopped_by}: stopping after step {step}, saving a checkpoint",
                    soft_wrap=True,
                )
            save_s, path = save_timed(step)
            if main:
                console.print(
                    f"stopped by {stopped_by} at step {step}: saved to {path} in {save_s:.2f} s; "
                    "continue with `tscale train CONFIG --resume`",
                    soft_wrap=True,
                    markup=False,
                )
        else:
            stopped_by = None
            if has_eval:
                last_eval, samples = run_eval()
                emit("on_eval", step=step, eval=last_eval, samples=samples)
            save_timed(step)
            if lora_model is not None and main:  # a PEFT adapter directory that `peft` loads
                export_adapter(
                    state.params,
                    lora_model.config,
                    run_dir / "adapter",
                    checkpoint_dir=ckpt.latest_checkpoint(ckpt_root),
                    base_model=cfg.model.path,
                )
    summary = {
        "steps": step - start_step,
        "final_step": step,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "tokens_per_s": train_tokens / train_time if train_time else float("nan"),
        "eval": last_eval,
        "data": bundle.report,
        "stopped_by": stopped_by,
    }
    emit("on_train_end", step=step, summary=summary)
    if main:
        _print_summary(console, summary, samples[: cfg.eval.num_show])
    par.shutdown()
    return TrainResult(run_dir=run_dir, final_step=step, state=state, summary=summary)


def _steps_from_epochs(
    cfg: Config, bundle: builders.DataBundle, run_dir: Path, console: Console, main: bool
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


def _row(step: int, m: dict[str, torch.Tensor], schedule, n_tokens: int) -> dict[str, Any]:
    """One metrics.jsonl row; ``lr`` is the schedule at the optimizer's own count, which lags
    the step by the number of skipped (non-finite) steps."""
    row: dict[str, Any] = {"step": step, "loss": float(m["loss"])}
    if "grad_norm" in m:
        row["grad_norm"] = float(m["grad_norm"])
    skipped = int(m["skipped"]) if "skipped" in m else 0
    row["lr"] = float(schedule(step - 1 - skipped))
    if "skipped" in m:
        row["skipped"] = skipped
    if "tokens" in m:
        row["tokens"] = int(m["tokens"])
    row["input_tokens"] = n_tokens
    return row


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


def _print_summary(console: Console, summary: dict[str, Any], samples: list[dict]) -> None:
    table = Table(title="run summary", show_header=False)
    table.add_row("steps", str(summary["steps"]))
    if summary.get("stopped_by"):
        table.add_row("stopped by", summary["stopped_by"])
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("training time", f"{summary['train_time_s']:.1f} s")
    tps = summary["tokens_per_s"]
    table.add_row("tokens/s (training)", "-" if math.isnan(tps) else f"{tps:,.0f}")
    for k, v in summary["eval"].items():
        table.add_row(f"eval {k}", f"{v:.2%}" if k.startswith("exact_match") else f"{v:.4f}")
    console.print(table)
    for s in samples:  # the prompt as the model saw it (through data.template)
        mark = "[green]✓[/]" if s["correct"] else "[red]✗[/]"
        shown = (escape(repr(s[k])) for k in ("prompt", "answer", "expected"))
        console.print("{} {} → {} (expected {})".format(mark, *shown))
