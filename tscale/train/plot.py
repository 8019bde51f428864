"""A picture of a config's learning-rate schedule: ``tscale schedule plot CFG -o lr.png``."""

from __future__ import annotations

from pathlib import Path

from tscale.config.schema import Config
from tscale.errors import TscaleError
from tscale.train import builders

__all__ = ["plot_schedule", "schedule_points"]

MAX_POINTS = 4000


def schedule_points(cfg: Config, max_points: int = MAX_POINTS) -> tuple[list[int], list[float]]:
    """``(steps, lrs)``: the learning rate the optimizer applies at each step ``0 ..
    train.max_steps - 1`` (at most ``max_points`` evenly spaced steps, both ends included).

    Raises:
        ConfigError: the scheduler or optimizer section is invalid.
    """
    schedule = builders.build_schedule(cfg)
    n = cfg.train.max_steps
    if n <= max_points:
        steps = list(range(n))
    else:
        steps = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return steps, [float(schedule(s)) for s in steps]


def plot_schedule(cfg: Config, out: str | Path) -> Path:
    """Write a PNG of the learning rate over ``train.max_steps`` to ``out``; return its path.

    Uses matplotlib's Agg canvas directly (no pyplot, no display needed).

    Raises:
        ConfigError: the scheduler or optimizer section is invalid.
        TscaleError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TscaleError("plotting needs matplotlib: pip install 'tscale[plot]'") from None
    steps, lrs = schedule_points(cfg)
    s = cfg.scheduler
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, lrs, linewidth=1.5)
    if 0 < s.warmup_steps < cfg.train.max_steps:
        ax.axvline(s.warmup_steps, linestyle="--", linewidth=0.8, color="gray", label="warmup end")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, max(cfg.train.max_steps - 1, 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"scheduler.type={s.type}  optimizer.lr={cfg.optimizer.lr:g}  "
        f"warmup_steps={s.warmup_steps}  train.max_steps={cfg.train.max_steps}",
        fontsize=9,
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
