"""``tscale data inspect`` and ``tscale data preview``: look at data before training on it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.text import Text

from tscale.config.load import load_config
from tscale.config.schema import Config, resolve_defaults
from tscale.data.introspect import inspect_source, length_histogram
from tscale.data.loader import IGNORE_INDEX
from tscale.errors import DataError
from tscale.train import data_build, data_report, data_sources


def inspect_path(path: str, *, split: str | None = None, fmt: str = "auto") -> str:
    """Splits, columns, detected format and column mapping of a dataset path (or hub name)."""
    return inspect_source(path, split=split, format=fmt).summary()


def histogram_lines(hist: dict[str, Any], *, width: int = 40) -> list[str]:
    """A text histogram of :func:`~tscale.data.introspect.length_histogram`'s bins: one line per
    bucket, ``lo-hi`` tokens, a bar scaled to the fullest bucket, the count."""
    rows = hist["bins"]
    most = max((c for _, _, c in rows), default=0)
    label = max((len(f"{lo}-{hi}") for lo, hi, _ in rows), default=0)
    count = max((len(str(c)) for _, _, c in rows), default=1)
    out = []
    for lo, hi, c in rows:
        bar = "█" * (round(width * c / most) if most else 0)
        if c and not bar:
            bar = "▏"  # a non-empty bucket is never shown empty
        out.append(f"  {f'{lo}-{hi}':>{label}} | {c:>{count}} {bar}")
    return out


def inspect_config(cfg: Config, console: Console) -> None:
    """What the config's data looks like after fitting, templating and tokenizing: counts,
    quarantined rows by reason, a histogram of example lengths with percentiles and max, and
    what the length budget truncated or dropped and what data.max_length cuts."""
    cfg = resolve_defaults(cfg)
    if cfg.data.streaming:  # inspect reads the whole training data, in memory
        cfg = attrs.evolve(cfg, data=attrs.evolve(cfg.data, streaming=False))
    run_dir = Path(cfg.run.output_dir)
    bundle = data_build.build_data(cfg, run_dir, make_examples=cfg.task.examples)
    data_report.print_report(console, bundle.report)
    for key, value in bundle.report.items():
        if value and key not in ("length", "train", "eval"):
            console.print(f"{key}: {value}")
    d = cfg.data
    lengths = bundle.example_lengths or [len(e["input_ids"]) for e in bundle.train_examples]
    hist = length_histogram(lengths, max_length=d.max_length)
    console.print(
        f"tokens per example: p50 {hist['p50']}, p90 {hist['p90']}, p99 {hist['p99']}, "
        f"max {hist['max']}, mean {hist['mean']:.1f} over {hist['count']} examples "
        f"(data.max_length {d.max_length})"
        if hist["count"]
        else f"tokens per example: p50 None (no example; data.max_length {d.max_length})",
        soft_wrap=True,
    )
    for line in histogram_lines(hist):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(_budget_line(cfg, bundle.report, hist), markup=False, soft_wrap=True)


def _budget_line(cfg: Config, report: dict[str, Any], hist: dict[str, Any]) -> str:
    """What the length budget did, and what happens to examples over data.max_length."""
    d = cfg.data
    length = report.get("length")
    split = d.packing.enabled and d.packing.split_overflow
    if length:
        limits = [n for n in (d.length.max_total_length, None if split else d.max_length) if n]
        limit = f"{report.get('limit')} {min(limits)}, " if limits else ""
        cut = ", ".join(
            f"{c} {r}: {n}"
            for c, rs in sorted(length["truncated_columns"].items())
            for r, n in rs.items()
        )
        reasons = length["dropped"]
        dropped = sum(reasons.values())
        line = (
            f"length budget ({limit}excess {d.length.excess}): truncated "
            f"{length['truncated_records']} of {length['records']} records"
            f"{f' ({cut})' if cut else ''}, dropped {dropped}"
            + (
                f" ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))})"
                if dropped
                else ""
            )
        )
    else:
        line = "length budget: none"
    if split:
        line += f"; {hist['over_budget']} examples over data.max_length {d.max_length}: split"
    return line


def preview_path(
    path: str,
    overrides: list[str],
    console: Console,
    *,
    n: int = 3,
    split: str | None = None,
    fmt: str = "auto",
) -> None:
    """:func:`preview` of a dataset file, directory or hub name (read as one data.sources
    entry), with the default config plus ``overrides`` (template, tokenizer, model.path …). The
    run directory (tokenizer cache) is a temporary one unless ``run.output_dir`` is overridden."""
    source: dict[str, Any] = {"split": split or "train", "format": fmt}
    source["path" if Path(path).exists() else "hf"] = path
    # batch_size 1: a small file is not too small for a batch; the overrides still win
    with tempfile.TemporaryDirectory(prefix="tscale-preview-") as tmp:
        base = {"run": {"output_dir": tmp}, "data": {"sources": [source], "batch_size": 1}}
        cfg = load_config(base, overrides)
        try:
            preview(cfg, console, n=n)
        except DataError:  # the quarantine file goes with the temporary directory
            data_dir = Path(cfg.run.output_dir) / "data"
            first = _first_quarantined(data_dir / "quarantine.jsonl") or _first_quarantined(
                data_dir / data_sources.DROPPED_FILE
            )
            if first is None:
                raise
            raise DataError(
                f"{path}: no example to preview; e.g. {first} (data.max_length, data.template "
                "and data.column_map are overrides: key=value after the path)"
            ) from None


def _first_quarantined(path: Path) -> str | None:
    """``reason (where)`` of the first record of a quarantine (or dropped) file, None without
    any."""
    try:
        with path.open() as f:
            row = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return f"{row.get('reason')} ({row.get('where')})"


def preview(cfg: Config, console: Console, n: int = 3) -> None:
    """Render ``n`` training examples exactly as the model sees them: trained tokens in bold
    green, tokens that are context only (masked out of the loss) dim."""
    cfg = resolve_defaults(cfg)
    bundle = data_build.build_data(cfg, Path(cfg.run.output_dir), make_examples=cfg.task.examples)
    tok = bundle.encoder.tokenizer
    console.print(
        Text("trained", style="bold green") + Text(" / ") + Text("not trained", style="dim")
    )
    for i, ex in enumerate(bundle.train_examples[:n]):
        ids, labels = ex["input_ids"], ex["labels"]
        line = Text(f"[{i}] ")
        for t, token in enumerate(ids):
            # labels are pre-shifted: token t is a target iff the label at t - 1 predicts it
            trained = t > 0 and labels[t - 1] != IGNORE_INDEX
            piece = tok.decode([token], skip_special_tokens=False)
            line.append(piece, style="bold green" if trained else "dim")
        console.print(line)
