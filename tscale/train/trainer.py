"""The one impure loop: data → step → callbacks → checkpoint.

:func:`tscale.train.run.build_run` assembles everything from the config; this module moves
batches through ``run.step``, reads metrics every ``log_every`` steps (the only host syncs),
evaluates, saves, stops on a signal and calls the hooks. Read :func:`train_loop` top to bottom.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tscale import checkpoint as ckpt
from tscale.config.schema import Config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import TrainingError
from tscale.optim.transforms import skipped_steps
from tscale.tasks.sft import evaluate_lm as evaluate
from tscale.tasks.sft import reference_answer
from tscale.train import distributed
from tscale.train.callbacks import Callback, strict_row
from tscale.train.run import MakeStep, Run, build_run
from tscale.train.signals import StopSignals

__all__ = ["TrainResult", "evaluate", "reference_answer", "train", "train_loop"]


@attrs.frozen(kw_only=True)
class TrainResult:
    """What a finished run returns (and prints as its summary)."""

    run_dir: Path
    final_step: int
    state: TrainState
    summary: dict[str, Any]


def train(
    cfg: Config,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    console: Console | None = None,
    make_step: MakeStep | None = None,
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
            the optimizer (default: the task's loss in ``make_train_step`` with the config's
            ``train.microbatches`` / ``train.donate``). Metrics must include ``loss``.
    """
    t_start = time.perf_counter()
    console = console or Console()
    run = build_run(
        cfg,
        resume=resume,
        overwrite=overwrite,
        callbacks=callbacks,
        console=console,
        make_step=make_step,
    )
    return train_loop(run, console, t_start=t_start)


class _Stopper:
    """``info["stop"]``: a callback calls it to end the run after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> None:
        self.requested = True


@attrs.define
class _Window:
    """The steps since the last flush: their metrics (tensors, not yet read), tokens and time."""

    pending: list[tuple[int, dict[str, torch.Tensor], int]] = attrs.field(factory=list)
    tokens: int = 0
    paused: float = 0.0
    t0: float = attrs.field(factory=time.perf_counter)


def train_loop(run: Run, console: Console, *, t_start: float | None = None) -> TrainResult:
    """Train ``run`` to ``train.max_steps`` (or a stop), evaluating and saving as configured."""
    t_start = time.perf_counter() if t_start is None else t_start
    cfg, t, main = run.cfg, run.cfg.train, run.is_main
    stop = _Stopper()

    def emit(name: str, **info: Any) -> None:
        info.setdefault("max_steps", t.max_steps)
        info["stop"] = stop
        for cb in run.hooks:
            getattr(cb, name)(info)

    state, step = run.state, int(run.state.step)
    start_step = step
    health = _NonFinite(limit=t.max_nonfinite_steps, skipped=_skipped_so_far(state))
    window, train_tokens, paused = _Window(), 0, 0.0
    last_eval: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    saved: list[Path | None] = [None]

    def flush() -> None:
        nonlocal window, train_tokens
        # all ranks: the window's tokens (each step's and the whole's), and a stop a rank-0
        # callback asked for at the last flush
        sums = run.par.sum_over_ranks(
            [float(window.tokens), float(stop.requested), *(float(n) for *_, n in window.pending)]
        )
        rows = []
        for (s, m, _), n in zip(window.pending, sums[2:], strict=True):
            row = _row(s, m, run.schedule, int(n), health.skipped)  # the host sync
            health.observe(row)
            rows.append(strict_row(row))  # NaN/inf -> null, listed under "nonfinite"
        elapsed = time.perf_counter() - window.t0 - window.paused
        stop.requested = stop.requested or bool(sums[1])
        train_tokens += int(sums[0])
        emit("on_step_end", step=step, rows=rows, tokens_per_s=sums[0] / max(elapsed, 1e-9))
        window = _Window()
        if main and health.new_bad:
            console.print(health.describe(), style="yellow", soft_wrap=True, markup=False)
        health.check(run.run_dir / "checkpoints")  # raises after too many bad steps in a row

    def save(at: int) -> tuple[float, Path | None]:
        t0 = time.perf_counter()
        _check_finite(run, state, at)  # a non-finite state is never saved as if it were good
        saved[0] = run.save(state, at, {"eval": last_eval})  # every rank
        seconds = time.perf_counter() - t0
        if main:
            emit("on_save", step=at, path=str(saved[0]), seconds=seconds)
        return seconds, saved[0]

    def evaluate_now() -> None:
        nonlocal last_eval, samples
        last_eval, samples = run.evaluate(state)
        emit("on_eval", step=step, eval=last_eval, samples=samples)

    signals = StopSignals()
    vote = distributed.StopVote(run.par)  # ranks agree on the step a signal stops the run at
    preempted = False
    assert t.max_steps is not None  # resolved by build_run
    if not run.has_eval and main:
        why = "gave no usable record" if cfg.data.eval_files else "is empty"
        console.print(
            f"no held-out data (data.eval_files {why}): no evaluation; list held-out files "
            "under data.eval_files to get eval loss and perplexity",
            soft_wrap=True,
        )
    emit("on_train_start", step=step)
    loop_t0 = time.perf_counter()
    with signals:  # SIGTERM/SIGINT: finish the step, save, return (restored on the way out)
        try:
            while step < t.max_steps and not stop.requested:
                batch = run.prepare_batch(next(run.batches))
                n_tokens = int((batch["input_ids"] != run.pad_id).sum())
                batch = batch.to(run.par.device, non_blocking=True)
                if run.rollout is not None:  # a batch stage that reads the state
                    batch = run.rollout(state, batch, R.fold_in(state.rng, step))
                for _ in range(run.task.updates_per_batch):  # several updates per rollout
                    state, metrics = run.step(state, batch)
                    step += 1
                    preempted = vote.poll(signals.requested is not None)
                    window.pending.append((step, metrics, n_tokens))
                    window.tokens += n_tokens
                    last = step == t.max_steps or preempted
                    if step % t.log_every == 0 or last:
                        flush()
                    if last:
                        break
                if preempted:
                    break
                t_pause = time.perf_counter()
                if t.eval_every and step % t.eval_every == 0 and run.has_eval and not last:
                    evaluate_now()
                if t.save_every and step % t.save_every == 0 and not last:
                    save(step)
                dt = time.perf_counter() - t_pause
                paused += dt
                window.paused += dt
            if window.pending:
                flush()
            # a signal during the last steps or a callback's stop: every rank decides the same
            preempted = vote.close(signals.requested is not None)
        except BaseException:
            emit("on_train_end", step=step, summary={"interrupted": True})
            raise
        train_time = time.perf_counter() - loop_t0 - paused
        stopped_by = (signals.requested or "a signal on another rank") if preempted else None
        if preempted:  # within the launcher's grace period: no final eval, save at once
            if main:
                console.print(
                    f"{stopped_by}: stopping after step {step}, saving a checkpoint",
                    soft_wrap=True,
                )
            save_s, path = save(step)
            if main:
                console.print(
                    f"stopped by {stopped_by} at step {step}: saved to {path} in {save_s:.2f} s; "
                    "continue with `tscale train CONFIG --resume`",
                    soft_wrap=True,
                    markup=False,
                )
        else:
            if run.has_eval:
                evaluate_now()
            save(step)
            run.finish(state)
    summary = {
        "steps": step - start_step,
        "final_step": step,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "tokens_per_s": train_tokens / train_time if train_time else float("nan"),
        "eval": last_eval,
        "data": run.data.report,
        "stopped_by": stopped_by,
    }
    emit("on_train_end", step=step, summary=summary)
    if main:
        _print_summary(console, summary, samples[: cfg.eval.num_show])
    run.par.shutdown()
    return TrainResult(run_dir=run.run_dir, final_step=step, state=state, summary=summary)


_FIRST = ("step", "loss", "grad_norm", "lr", "skipped", "tokens", "input_tokens")


def _row(
    step: int, m: dict[str, torch.Tensor], schedule: Callable, n_tokens: int, skipped_before: int
) -> dict:
    """One metrics.jsonl row: the step's fixed keys first, then every metric the task's loss
    returned (by name). ``lr`` is the learning rate the step's update used — or, for a skipped
    step, would have used: the schedule at the optimizer's own count of applied updates
    (``step - 1 - skipped_before``), which lags the step by the steps skipped before it."""
    row: dict[str, Any] = {"step": step, "loss": float(m["loss"])}
    if "grad_norm" in m:
        row["grad_norm"] = float(m["grad_norm"])
    skipped = int(m["skipped"]) if "skipped" in m else 0
    row["lr"] = float(schedule(step - 1 - skipped_before))
    if "skipped" in m:
        row["skipped"] = skipped
    if "tokens" in m:
        row["tokens"] = int(m["tokens"])
    row["input_tokens"] = n_tokens
    for key, value in m.items():
        if key not in _FIRST:
            row[key] = _number(value)
    return row


@attrs.define
class _NonFinite:
    """Watches the rows for steps whose update was skipped (non-finite gradients) or whose loss
    is NaN/inf; says so on the console and stops the run after ``limit`` of them in a row."""

    limit: int
    skipped: int  # the optimizer's skip count before the next row
    streak: list[int] = attrs.field(factory=list)  # the consecutive bad steps so far
    new_bad: list[int] = attrs.field(factory=list)  # bad steps since the last describe()

    def observe(self, row: dict[str, Any]) -> None:
        skipped = row.get("skipped", self.skipped)
        bad = skipped > self.skipped or not math.isfinite(row["loss"])
        self.skipped = skipped
        self.streak = [*self.streak, row["step"]] if bad else []
        if bad:
            self.new_bad.append(row["step"])

    def describe(self) -> str:
        steps, self.new_bad = self.new_bad, []
        shown = ", ".join(map(str, steps[:8])) + (" …" if len(steps) > 8 else "")
        return (
            f"step{'s' * (len(steps) > 1)} {shown}: non-finite gradients or loss "
            f"({self.skipped} update{'s' * (self.skipped != 1)} skipped so far; "
            f"{len(self.streak)} bad step{'s' * (len(self.streak) != 1)} in a row, the run stops "
            f"at {self.limit or 'never'}: train.max_nonfinite_steps)"
        )

    def check(self, checkpoints: Path) -> None:
        if not self.limit or len(self.streak) < self.limit:
            return
        last = ckpt.latest_checkpoint(checkpoints)
        raise TrainingError(
            f"steps {self.streak[0]}-{self.streak[-1]}: {len(self.streak)} steps in a row with "
            "non-finite gradients or loss (train.max_nonfinite_steps); stopped without saving, "
            f"the last good checkpoint is {last or 'none'}; lower optimizer.lr, set "
            "optimizer.max_grad_norm, or check the data and model.dtype"
        )


def _skipped_so_far(state: TrainState) -> int:
    """The optimizer's count of skipped updates (a resumed run starts from its checkpoint's)."""
    count = skipped_steps(state.opt_state)
    if count is None:
        return 0
    return int(count.full_tensor() if hasattr(count, "full_tensor") else count)


def _check_finite(run: Run, state: TrainState, step: int) -> None:
    """Raise instead of saving params that hold NaN/inf (every rank checks its shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in T.leaves(state.params)]
    flags = [~torch.isfinite(t).all() for t in local if t.is_floating_point()]
    bad = bool(torch.stack(flags).any()) if flags else False  # one host read for the tree
    if run.par.sum_over_ranks([float(bad)])[0]:
        last = ckpt.latest_checkpoint(run.run_dir / "checkpoints")
        raise TrainingError(
            f"step {step}: the params hold NaN/inf, so they are not saved (the last good "
            f"checkpoint is {last or 'none'}); lower optimizer.lr, set optimizer.max_grad_norm, "
            "or keep optimizer.skip_nonfinite: true (a non-finite step is then skipped)"
        )


def _number(value: Any) -> float | int:
    """A metric tensor (0-d) as a Python number: ints stay ints."""
    if isinstance(value, torch.Tensor):
        return int(value) if not value.is_floating_point() else float(value)
    return value


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
