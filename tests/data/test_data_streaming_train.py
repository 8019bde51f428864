"""data.streaming through the trainer: packed batches on the fly, and a resume from a checkpoint
that gives the same losses as the uninterrupted run (the cursor holds the stream position)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tscale.config import load_config
from tscale.train import train
from tscale.train.callbacks import Callback

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.max_position_embeddings=64",
    "data.synthetic.num_train=120",
    "data.synthetic.num_eval=4",
    "data.synthetic.max_items=5",
    "data.tokenizer.vocab_size=300",
    "data.batch_size=4",
    "data.max_length=64",
    "data.streaming=true",
    "data.packing.enabled=true",
    "data.packing.buffer_size=4",
    "scheduler.warmup_steps=1",
    "train.max_steps=10",
    "train.log_every=1",
    "train.save_every=3",
    "train.progress=false",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.num_show=0",
]


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info: dict) -> None:
        if info["step"] >= self.step:
            info["stop"]()


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_streaming_run_resumes_exactly(tmp_path: Path):
    quiet = Console(quiet=True)
    whole = tmp_path / "whole"
    result = train(load_config(None, [*TINY, f"run.output_dir={whole}"]), console=quiet)
    assert result.summary["data"]["streaming"] is True
    assert result.summary["data"]["train_rows"] >= 40  # rows read so far, counted as they come
    part = tmp_path / "part"
    cfg = load_config(None, [*TINY, f"run.output_dir={part}"])
    assert train(cfg, callbacks=[_StopAt(5)], console=quiet).final_step == 5
    cursor = json.loads((part / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert cursor["cursor"]["rows"] > 0 and cursor["cursor"]["packer"] is not None
    train(cfg, resume=True, console=quiet)
    assert _losses(part) == _losses(whole)
