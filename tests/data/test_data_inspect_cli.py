"""`tscale data inspect CFG`: length histogram, percentiles, max, and what the budget cuts."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tscale.config import load_config
from tscale.data.introspect import length_histogram
from tscale.train.data_cli import histogram_lines, inspect_config


def _inspect(tmp_path: Path, *overrides: str) -> str:
    rows = [
        {
            "prompt": "Tell me a story. " * (1 + i % 7),
            "completion": "Once upon a time. " * (i % 5 + 1),
        }
        for i in range(60)
    ]
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.train_files=[{train}]",
            "data.tokenizer.vocab_size=320",
            "data.batch_size=8",
            *overrides,
        ],
    )
    console = Console(record=True, width=200)
    inspect_config(cfg, console)
    return console.export_text()


def test_inspect_prints_a_histogram_and_what_the_budget_does(tmp_path: Path):
    out = _inspect(tmp_path, "data.max_length=48")
    assert "tokens per example: p50" in out and "max " in out
    bars = [line for line in out.splitlines() if " | " in line]
    assert 2 <= len(bars) <= 10 and any("█" in b for b in bars)
    # over-long rows are truncated to data.max_length, not lost: all 60 are in the histogram
    assert sum(int(b.split("|")[1].split()[0]) for b in bars) == 60
    assert "data: 60 training rows read: 60 trained, 0 dropped, 0 quarantined" in out
    assert "length budget (data.max_length 48, excess truncate): truncated" in out
    truncated = int(out.split("excess truncate): truncated ")[1].split()[0])
    assert truncated > 0 and f"of the trained rows: {truncated} truncated" in out

    out = _inspect(tmp_path, "data.max_length=48", "data.length.excess=drop")
    dropped = int(out.split("trained, ")[1].split()[0])
    assert dropped == truncated and f"dropped {dropped} (token_budget: {dropped})" in out
    out = _inspect(
        tmp_path,
        "data.max_length=48",
        "data.packing.enabled=true",
        "data.packing.split_overflow=true",
    )
    assert "length budget: none" in out and "examples over data.max_length 48: split" in out
    assert f"{truncated} split over several packed rows" in out


def test_histogram_buckets_cover_the_lengths_and_stop_at_the_top():
    hist = length_histogram([3, 5, 9, 20, 20], max_length=24, bins=10)
    assert hist["bins"][-1][1] == 24 and all(lo <= hi for lo, hi, _ in hist["bins"])
    lines = histogram_lines(hist, width=10)
    assert len(lines) == len(hist["bins"])
    assert lines[-3].rstrip().endswith("2 ██████████")  # the fullest bucket gets the full width
