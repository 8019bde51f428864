"""Callbacks: what the trainer tells the world. Called on the host, every ``log_every`` steps.

A callback implements any of ``on_train_start(info)``, ``on_step_end(info)``, ``on_eval(info)``,
``on_save(info)``, ``on_train_end(info)``. ``info`` is a plain dict; metric values in it are
Python numbers (the trainer has already read them from the device). A callback stops the run
early by calling ``info["stop"]()``.
"""

from __future__ import annotations

import json
import time
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


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, info: Info) -> None:
        """The run starts (or resumes) at ``info["step"]`` of ``info["max_steps"]``."""

    def on_step_end(self, info: Info) -> None:
        """Metrics of the steps since the last call: ``info["rows"]`` (one dict per step)."""

    def on_eval(self, info: Info) -> None:
        """An evaluation finished: ``info["eval"]`` holds its metrics."""

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
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def on_step_end(self, info: Info) -> None:
        self._write(info["rows"])

    def on_eval(self, info: Info) -> None:
        self._write([{"step": info["step"], **{f"eval/{k}": v for k, v in info["eval"].items()}}])


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


class ProgressBar(Callback):
    """Console reporting: a rich progress bar (step, loss, lr, tokens/s, ETA) when ``bar`` is set
    and the console is a terminal, else a plain log line every few seconds; eval results and
    saves are printed either way."""

    def __init__(self, console: Console, *, bar: bool = True, every_s: float = 5.0) -> None:
        self.console = console
        self.bar = bar
        self.every_s = every_s
        self.progress: Progress | None = None
        self.task: Any = None
        self._last_print = 0.0

    def on_train_start(self, info: Info) -> None:
        if not (self.bar and self.console.is_terminal):
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=info["max_steps"], completed=info["step"], loss="-", lr="-", tps="-"
        )

    def on_step_end(self, info: Info) -> None:
        last = info["rows"][-1]
        fields = {
            "loss": f"{last['loss']:.4f}",
            "lr": f"{last['lr']:.2e}",
            "tps": f"{info['tokens_per_s']:,.0f}",
        }
        if self.progress is not None:
            self.progress.update(self.task, completed=last["step"], **fields)
            return
        now = time.monotonic()
        if now - self._last_print >= self.every_s or last["step"] == info["max_steps"]:
            self._last_print = now
            self.console.print(
                f"step {last['step']}/{info['max_steps']}  loss {fields['loss']}  "
                f"lr {fields['lr']}  {fields['tps']} tok/s"
            )

    def on_eval(self, info: Info) -> None:
        ev = info["eval"]
        parts = [f"loss {ev['loss']:.4f}"] if "loss" in ev else []
        if "perplexity" in ev:
            parts.append(f"perplexity {ev['perplexity']:.2f}")
        if "exact_match" in ev:
            parts.append(f"exact-match {ev['exact_match']:.1%}")
        self.console.print(f"eval @ step {info['step']}: {'  '.join(parts) or 'no metrics'}")

    def on_save(self, info: Info) -> None:
        took = f" in {info['seconds']:.2f} s" if "seconds" in info else ""
        self.console.print(
            f"saved step {info['step']} to {info['path']}{took}", style="dim", soft_wrap=True
        )

    def on_train_end(self, info: Info) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
