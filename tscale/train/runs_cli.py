"""``tscale runs [FOLDER]``: the runs under a folder, each with its last step, loss and eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tscale import checkpoint as ckpt
from tscale.errors import ConfigError


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    """The last training row and the last eval figures of ``run_dir`` (from ``metrics.jsonl``)
    and its newest checkpoint; None when the folder is not a run (no metrics, no checkpoints)."""
    metrics, ckpts = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    if not metrics.is_file() and not ckpts.is_dir():
        return None
    step, loss, evals = None, None, {}
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rows before it stand
            continue
        if "loss" in row:
            step, loss = row.get("step"), row["loss"]
        evals.update({k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")})
    latest = ckpt.latest_checkpoint(ckpts) if ckpts.is_dir() else None
    return {
        "run": run_dir.name,
        "step": step,
        "loss": loss,
        "eval": evals,
        "checkpoint": latest.name if latest is not None else None,
    }


def list_runs(folder: str | Path) -> list[dict[str, Any]]:
    """:func:`run_summary` of ``folder`` itself when it is a run, else of each run below it.

    Raises:
        ConfigError: ``folder`` does not exist.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"tscale runs: {root} is not a folder; give the folder of your runs")
    own = run_summary(root)
    if own is not None:
        return [own]
    found = (run_summary(d) for d in sorted(root.iterdir()) if d.is_dir())
    return [r for r in found if r is not None]


def _number(value: Any, percent: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1%}" if percent else f"{value:.4g}"


def print_runs(folder: str | Path, console: Console) -> None:
    """A table of :func:`list_runs`: run, last step, train loss, eval loss / exact match,
    newest checkpoint."""
    runs = list_runs(folder)
    if not runs:
        console.print(f"no runs under {folder} (a run has metrics.jsonl or checkpoints/)")
        return
    table = Table(title=f"runs under {folder}")
    for name in ("run", "step", "loss", "eval loss", "eval exact match", "checkpoint"):
        table.add_column(name)
    for r in runs:
        table.add_row(
            r["run"],
            "-" if r["step"] is None else str(r["step"]),
            _number(r["loss"]),
            _number(r["eval"].get("loss")),
            _number(r["eval"].get("exact_match"), percent=True),
            r["checkpoint"] or "-",
        )
    console.print(table)
