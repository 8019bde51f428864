"""Callbacks: what the trainer tells the world. Called on the host, every ``log_every`` steps.

A callback implements any of ``on_train_start(info)``, ``on_step_end(info)``, ``on_eval(info)``,
``on_save(info)``, ``on_train_end(info)``. ``info`` is a plain dict; metric values in it are
Python numbers (the trainer has already read them from the device). A callback stops the run
early by calling ``info["stop"]()``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Info = dict[str, Any]


NONFINITE = "nonfinite"
"""The row key listing the metrics whose value was NaN or inf (written as null)."""


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as strict JSON allows: each non-finite float becomes null and its key is listed
    under ``"nonfinite"`` (every reader, tscale's and the loggers', sees the same row)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    out: dict[str, Any] = {k: (None if k in bad else v) for k, v in row.items()}
    out[NONFINITE] = sorted(set(out.get(NONFINITE) or []) | set(bad))
    return out


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, info: Info) -> None:
        """The run starts (or resumes) at ``info["step"]`` of ``info["max_steps"]``."""

    def on_step_end(self, info: Info) -> None:
        """Metrics of the steps since the last call: ``info["rows"]`` (one dict per step)."""

    def on_eval(self, info: Info) -> None:
        """An evaluation finished: ``info["eval"]`` holds its metrics, ``info["samples"]`` (when
        the trainer passes them) its greedy answers (``prompt``, ``answer``, ``expected``,
        ``correct``)."""

    def on_save(self, info: Info) -> None:
        """A checkpoint of step ``info["step"]`` was written to ``info["path"]`` (in
        ``info["seconds"]``, every rank's part included)."""

    def on_train_end(self, info: Info) -> None:
        """The run ended: ``info["summary"]`` (``stopped_by``: the signal that ended it early,
        after a checkpoint; ``interrupted``: an exception or a second Ctrl-C, no checkpoint)."""


class JsonlLogger(Callback):
    """Appends one JSON object per step (and per eval) to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:  # strict JSON: a non-finite number is null, named in "nonfinite"
                f.write(json.dumps(strict_row(row), allow_nan=False) + "\n")

    def on_step_end(self, info: Info) -> None:
        self._write(info["rows"])

    def on_eval(self, info: Info) -> None:
        self._write([eval_row(info)])


def eval_row(info: Info) -> dict[str, Any]:
    """The metrics.jsonl row of an ``on_eval``: ``{"step": s, "eval/<name>": value, …}``. Every
    logger names eval metrics through this, so they match metrics.jsonl."""
    return {"step": info["step"], **{f"eval/{k}": v for k, v in info["eval"].items()}}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row other than ``step``, as floats (every key, whatever the task
    logs: the loggers send exactly these; a boolean counts as 0/1)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop rows with ``step > after_step`` (a resumed run re-logs the steps it redoes)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= after_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


# row keys every run logs; any other key of a row is one of the task's metrics
_BOOKKEEPING = frozenset(
    {"step", "loss", "lr", "grad_norm", "tokens", "input_tokens", "skipped", NONFINITE}
)


def _fmt(row: dict, key: str, spec: str) -> str:
    """A row's metric for the console: ``-`` when absent, ``nan`` when non-finite (null)."""
    if key in row and row[key] is None:
        return "nan"
    value = row.get(key)
    return format(value, spec) if isinstance(value, int | float) else "-"


class ProgressBar(Callback):
    """Console reporting: a rich progress bar when ``bar`` is set and the console is a terminal,
    else a plain log line every ``every_s`` seconds (and at the last step); eval results and saves
    are printed either way. Both show the epoch (with ``steps_per_epoch``: runs sized by
    ``train.epochs``), step, loss, lr, tokens/s, ETA and the task's key metrics (``key_metrics``,
    or the first ``max_extra`` keys of the row beyond the ones every run logs)."""

    def __init__(
        self,
        console: Console,
        *,
        bar: bool = True,
        every_s: float = 5.0,
        steps_per_epoch: int | None = None,
        epochs: float | None = None,
        key_metrics: Sequence[str] | None = None,
        max_extra: int = 3,
    ) -> None:
        self.console = console
        self.bar = bar
        self.every_s = every_s
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.key_metrics = key_metrics
        self.max_extra = max_extra
        self.progress: Progress | None = None
        self.task: Any = None
        self._last_print = 0.0
        self._t0 = time.monotonic()
        self._start_step = 0
        self._first: tuple[float, int] | None = None

    @classmethod
    def for_run(cls, console: Console, cfg: Any, loader: Any) -> ProgressBar:
        """The trainer's progress reporter: ``train.progress``, and the epoch when the run is
        sized by ``train.epochs`` (the loader's steps per epoch; with ``data.max_tokens`` the
        first epoch's), and the task's ``key_metrics`` when it names some."""
        per_epoch = getattr(loader, "num_batches_per_epoch", None)
        sized_by_epochs = cfg.train.epochs is not None and per_epoch
        return cls(
            console,
            bar=cfg.train.progress,
            steps_per_epoch=per_epoch if sized_by_epochs else None,
            epochs=cfg.train.epochs if sized_by_epochs else None,
            key_metrics=getattr(cfg.task, "key_metrics", None) or None,
        )

    def on_train_start(self, info: Info) -> None:
        self._t0 = time.monotonic()
        self._start_step = info["step"]
        self._first = None
        if not (self.bar and self.console.is_terminal):
            return
        self.progress = Progress(
            TextColumn("[bold]train{task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"
                "{task.fields[extra]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train",
            total=info["max_steps"],
            completed=info["step"],
            loss="-",
            lr="-",
            tps="-",
            epoch=self._epoch(info["step"]),
            extra="",
        )

    def _epoch(self, step: int) -> str:
        if not self.steps_per_epoch:
            return ""
        total = f"/{self.epochs:g}" if self.epochs is not None else ""
        return f" epoch {step / self.steps_per_epoch:.2f}{total}"

    def _extra(self, row: dict[str, Any]) -> str:
        keys = self.key_metrics
        if keys is None:
            keys = [k for k in row if k not in _BOOKKEEPING][: self.max_extra]
        parts = [f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), int | float)]
        return "".join(f"  {p}" for p in parts)

    def _eta(self, step: int, max_steps: int) -> str:
        # from the first logged window on (loggers' start-up stays out of it), else from the start
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
            t0, s0 = self._t0, self._start_step
        else:
            t0, s0 = self._first
        if step <= s0:
            return "-"
        left = (now - t0) / (step - s0) * max(max_steps - step, 0)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left:.0f} s"

    def on_step_end(self, info: Info) -> None:
        last = info["rows"][-1]
        fields = {
            "loss": _fmt(last, "loss", ".4f"),
            "lr": _fmt(last, "lr", ".2e"),
            "tps": f"{info['tokens_per_s']:,.0f}",
            "epoch": self._epoch(last["step"]),
            "extra": self._extra(last),
        }
        if self.progress is not None:
            self.progress.update(self.task, completed=last["step"], **fields)
            return
        now = time.monotonic()
        if now - self._last_print >= self.every_s or last["step"] == info["max_steps"]:
            self._last_print = now
            epoch = fields["epoch"].strip()
            self.console.print(
                (f"{epoch}  " if epoch else "")
                + f"step {last['step']}/{info['max_steps']}  loss {fields['loss']}  "
                f"lr {fields['lr']}  {fields['tps']} tok/s{fields['extra']}  "
                f"ETA {self._eta(last['step'], info['max_steps'])}",
                soft_wrap=True,
                markup=False,
            )

    def on_eval(self, info: Info) -> None:
        ev = info["eval"]
        parts = [f"loss {ev['loss']:.4f}"] if "loss" in ev else []
        if "perplexity" in ev:
            parts.append(f"perplexity {ev['perplexity']:.2f}")
        if "exact_match" in ev:
            parts.append(f"exact-match {ev['exact_match']:.1%}")
        for k in self.key_metrics or ():  # the task's own, as its held-out value (DPO's accuracy)
            if isinstance(ev.get(k), int | float):
                parts.append(f"{k} {ev[k]:.4g}")
        self.console.print(
            f"eval @ step {info['step']}: {'  '.join(parts) or 'no metrics'}",
            soft_wrap=True,
            markup=False,
        )

    def on_save(self, info: Info) -> None:
        took = f" in {info['seconds']:.2f} s" if "seconds" in info else ""
        self.console.print(
            f"saved step {info['step']} to {info['path']}{took}", style="dim", soft_wrap=True
        )

    def on_train_end(self, info: Info) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
