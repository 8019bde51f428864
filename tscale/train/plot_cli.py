"""``tscale plot RUN [RUN ...] -o curves.png``: a run's curves, several runs overlaid.

Reads each run's ``metrics.jsonl`` (every step's ``loss``, ``lr``, ``grad_norm`` … and the eval
rows ``eval/…``) and ``throughput.jsonl`` (``tokens_per_s`` per logging window). One panel per
metric; the ``loss`` panel holds the training loss (solid) and the held-out loss (dashed, dots),
each run in its own colour with a legend. ``smoothing`` (0 ≤ w < 1) draws an exponential moving
average over the faint raw curve, as TensorBoard's slider does (not for eval points, ``lr`` or
``skipped``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tscale.errors import ConfigError, TscaleError

__all__ = ["DEFAULT_METRICS", "make_figure", "plot_runs", "read_run", "smooth"]

DEFAULT_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")
_TITLES = {
    "loss": "loss (train —, eval --)",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tokens_per_s": "tokens/s",
}

_EXACT = frozenset({"lr", "skipped"})  # schedules and counts: a moving average would only lag
Curves = dict[str, tuple[list[int], list[float]]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rows before it stand
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_run(run: str | Path) -> Curves:
    """``{metric: (steps, values)}`` of a run directory (or its ``metrics.jsonl``): every numeric
    key of ``metrics.jsonl`` plus ``tokens_per_s`` from ``throughput.jsonl`` when present.

    Raises:
        ConfigError: no ``metrics.jsonl`` there.
    """
    path = Path(run)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"tscale plot: {run} is not a run (no metrics.jsonl there)")
    rows = _jsonl(metrics)
    throughput = metrics.parent / "throughput.jsonl"
    if throughput.is_file():
        rows += [{"step": r["step"], "tokens_per_s": r["tokens_per_s"]} for r in _jsonl(throughput)]
    curves: Curves = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            steps, values = curves.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    return curves


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (``weight`` 0: the values; towards 1: smoother);
    non-finite values pass through without entering the average."""
    if not 0 <= weight < 1:
        raise ConfigError(f"tscale plot: --smooth must be in [0, 1), got {weight}")
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        avg, n = avg * weight + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight**n) if weight else avg)
    return out


def _labels(runs: Sequence[Path]) -> list[str]:
    names = [(r.parent if r.is_file() else r).name or str(r) for r in runs]
    return [str(r) if names.count(n) > 1 else n for n, r in zip(names, runs, strict=True)]


def make_figure(
    runs: Sequence[str | Path],
    *,
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.0,
    labels: Sequence[str] | None = None,
) -> Any:
    """A matplotlib ``Figure`` of ``runs``: one panel per metric (default: those of
    :data:`DEFAULT_METRICS` that any run has), one colour per run. Each plotted line's gid is
    ``"<label>:<metric>"`` (``":raw"`` appended for the faint raw curve under a smoothed one).

    Raises:
        ConfigError: a run without metrics, or a metric no run has (the message lists them).
        TscaleError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TscaleError("tscale plot needs matplotlib: pip install 'tscale[plot]'") from None
    paths = [Path(r) for r in runs]
    if not paths:
        raise ConfigError("tscale plot: give at least one run directory")
    data = [read_run(p) for p in paths]
    names = list(labels) if labels else _labels(paths)
    have = set().union(*data)
    if metrics:
        missing = [m for m in metrics if m not in have]
        if missing:
            raise ConfigError(
                f"tscale plot: no run has {', '.join(missing)}; the runs have: "
                f"{', '.join(sorted(have)) or 'no metrics'}"
            )
        panels = list(dict.fromkeys(metrics))
    else:
        panels = [m for m in DEFAULT_METRICS if m in have or (m == "loss" and "eval/loss" in have)]
    if not panels:
        raise ConfigError(f"tscale plot: {', '.join(map(str, paths))} hold no metric rows yet")
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    # fixed margins: a layout engine would triple the drawing time, paid at every run's end
    fig = Figure(figsize=(6 * cols, 3.4 * rows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    top = 1 - 0.35 / (3.4 * rows + 0.3)
    fig.subplots_adjust(left=0.09 / cols, right=0.98, bottom=0.6 / (3.4 * rows), top=top)
    fig.subplots_adjust(hspace=0.45, wspace=0.22)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(paths))]
    for ax, metric in zip(axes, panels, strict=False):
        for curves, name, color in zip(data, names, colors, strict=True):
            series = [(metric, "-", name)]
            if metric == "loss" and "eval/loss" in curves:
                series.append(("eval/loss", "--", f"{name} (eval)"))
            for key, style, label in series:
                if key not in curves:
                    continue
                steps, values = curves[key]
                marker = "o" if key.startswith("eval/") else None
                gid = f"{name}:{key}"
                if smoothing and key not in _EXACT and not key.startswith("eval/"):
                    ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=1)
                    ax.lines[-1].set_gid(gid + ":raw")
                    values = smooth(values, smoothing)
                (line,) = ax.plot(
                    steps, values, style, color=color, marker=marker, markersize=3, label=label
                )
                line.set_gid(gid)
        ax.set_title(_TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric in ("loss", "grad_norm") and _spans_decades(ax):
            ax.set_yscale("log")
        if len(paths) > 1 or metric == "loss":
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


def _spans_decades(ax: Any) -> bool:
    """All values positive and the largest over 20x the smallest: a log axis shows more."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    return bool(ys) and min(ys) > 0 and max(ys) > 20 * min(ys)


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.0,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write :func:`make_figure` of ``runs`` as a PNG to ``out``; return its path."""
    fig = make_figure(runs, metrics=metrics, smoothing=smoothing, labels=labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
