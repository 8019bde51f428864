"""``tscale plot``: two short quickstart-like runs (adamw vs lion) drawn into one PNG; the plotted
lines' data (matplotlib Line2D) are both runs' metrics.jsonl values; the end-of-run curves.png."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tscale import cli
from tscale.config import load_config
from tscale.train import train

pytest.importorskip("matplotlib", reason="the plot extra (in dev) is not installed")

from tscale.train.plot_cli import make_figure, smooth

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
SMALL = [  # the quickstart's model and data recipe, shrunk to seconds
    "data.synthetic.num_train=400",
    "data.synthetic.num_eval=16",
    "eval.num_samples=8",
    "eval.num_show=0",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=6",
    "train.save_every=0",
    "train.progress=false",
    "scheduler.warmup_steps=2",
    "run.threads=1",
]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    for opt in ("adamw", "lion"):
        cfg = load_config(
            QUICKSTART, [*SMALL, f"optimizer.type={opt}", f"run.output_dir={root / opt}"]
        )
        train(cfg, console=Console(file=io.StringIO()))
    return root / "adamw", root / "lion"


def test_plot_overlays_both_runs_lines(two_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    adamw, lion = two_runs
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(adamw), str(lion), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {out}"

    fig = make_figure([adamw, lion])
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss (train —, eval --)", "learning rate", "gradient norm", "tokens/s"]
    for name, run in (("adamw", adamw), ("lion", lion)):
        rows = _rows(run)
        for key in ("loss", "lr", "grad_norm", "eval/loss"):
            want = [(r["step"], r[key]) for r in rows if key in r]
            line = lines[f"{name}:{key}"]
            got = list(zip(line.get_xdata(), line.get_ydata(), strict=True))
            assert got == want, (name, key)
        speed = [json.loads(x) for x in (run / "throughput.jsonl").read_text().splitlines()]
        assert [r["step"] for r in speed] == [4, 8, 12]
        assert list(lines[f"{name}:tokens_per_s"].get_ydata()) == [r["tokens_per_s"] for r in speed]
    assert lines["adamw:loss"].get_ydata()[-1] != lines["lion:loss"].get_ydata()[-1]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["adamw", "adamw (eval)", "lion", "lion (eval)"]
    for run in two_runs:  # log.plot: each run drew its own curves at the end
        assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_chosen_metrics_and_smoothing(two_runs: tuple[Path, Path]) -> None:
    adamw, lion = two_runs
    fig = make_figure([adamw, lion], metrics=["eval/exact_match", "loss", "lr"], smoothing=0.6)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
        "eval/exact_match",
        "loss (train —, eval --)",
        "learning rate",
    ]
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    raw = [r["loss"] for r in _rows(lion) if "loss" in r]
    assert list(lines["lion:loss:raw"].get_ydata()) == raw
    assert list(lines["lion:loss"].get_ydata()) == smooth(raw, 0.6)
    assert "lion:eval/loss:raw" not in lines  # eval points are few: never smoothed
    assert "lion:lr:raw" not in lines  # a schedule: an average would only lag
    assert list(lines["lion:lr"].get_ydata()) == [r["lr"] for r in _rows(lion) if "lr" in r]


def test_smooth() -> None:
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert smooth([5.0] * 4, 0.9) == pytest.approx([5.0] * 4)  # debiased: no ramp from 0
    got = smooth([0.0, 10.0], 0.5)
    assert got == pytest.approx([0.0, 10.0 * 0.5 / (1 - 0.25)])


def test_plot_mistakes_are_one_line_exit_2(two_runs: tuple[Path, Path], tmp_path: Path, capsys):
    adamw, _ = two_runs
    out = str(tmp_path / "x.png")
    cases = [
        (["plot", str(tmp_path / "nope"), "-o", out], "is not a run (no metrics.jsonl there)"),
        (["plot", str(adamw), "--metrics", "loss,reward", "-o", out], "no run has reward;"),
        (["plot", str(adamw), "--smooth", "1.5", "-o", out], "--smooth must be in [0, 1)"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_plot_without_matplotlib_names_the_extra(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # not installed
    assert cli.main(["plot", str(two_runs[0]), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tscale: error: tscale plot needs matplotlib: pip install 'tscale[plot]'"
