"""``tscale data inspect`` and ``tscale data preview``: look at data before training on it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from tscale.config.schema import Config
from tscale.data.introspect import inspect_source, length_histogram
from tscale.data.loader import IGNORE_INDEX
from tscale.train import builders


def inspect_path(path: str, *, split: str | None = None, fmt: str = "auto") -> str:
    """Splits, columns, detected format and column mapping of a dataset path (or hub name)."""
    return inspect_source(path, split=split, format=fmt).summary()


def inspect_config(cfg: Config, console: Console) -> None:
    """What the config's data looks like after templating and tokenizing: counts, quarantined
    rows by reason, and the token-length distribution against ``data.max_length``."""
    run_dir = Path(cfg.run.output_dir)
    bundle = builders.build_data(cfg, run_dir)
    for key, value in bundle.report.items():
        if value:
            console.print(f"{key}: {value}")
    lengths = [len(e["input_ids"]) for e in bundle.train_examples]
    hist = length_histogram(lengths, max_length=cfg.data.max_length)
    console.print(
        f"tokens per {'packed row' if cfg.data.packing.enabled else 'example'}: "
        f"p50 {hist['p50']}, p90 {hist['p90']}, p99 {hist['p99']}, max {hist['max']} "
        f"(data.max_length {cfg.data.max_length})"
    )


def preview(cfg: Config, console: Console, n: int = 3) -> None:
    """Render ``n`` training examples exactly as the model sees them: trained tokens in bold
    green, tokens that are context only (masked out of the loss) dim."""
    bundle = builders.build_data(cfg, Path(cfg.run.output_dir))
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
