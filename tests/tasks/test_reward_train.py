"""A reward model through ``tscale train`` and ``tscale export``: pairs in, the loss falls from
ln 2, and the exported ``*ForSequenceClassification`` folder scores the held-out pairs in
``transformers`` as tscale does (full fine-tuning and LoRA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tscale.checkpoint.reward import load_reward_model
from tscale.cli import main
from tscale.testing.preference import letter_pairs, write_pairs
from tscale.testing.runs import step_rows

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("lora", [False, True])
def test_reward_run_trains_and_exports(tmp_path: Path, lora: bool) -> None:
    write_pairs(tmp_path / "train.jsonl", 64, 0)
    write_pairs(tmp_path / "eval.jsonl", 8, 1)
    held = letter_pairs(8, 1)
    out = tmp_path / "run"
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("run: {seed: 0}\ntask: {type: reward, center_rewards_coefficient: 0.01}\n")
    args = [
        "train",
        str(cfg),
        f"run.output_dir={out}",
        "run.threads=1",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.max_position_embeddings=64",
        "data.tokenizer.vocab_size=300",
        f"data.train_files=[{tmp_path / 'train.jsonl'}]",
        f"data.eval_files=[{tmp_path / 'eval.jsonl'}]",
        "data.batch_size=8",
        "data.max_length=48",
        "optimizer.lr=0.003",
        "scheduler.warmup_steps=0",
        "train.max_steps=12",
        "train.log_every=1",
        "train.eval_every=12",
        "train.progress=false",
        "eval.batch_size=4",
        *(["lora.enabled=true", "lora.rank=4"] if lora else []),
    ]
    assert main(args) == 0
    rows = [r for r in step_rows(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head: r ≈ 0
    assert {"accuracy", "margin", "rewards/chosen", "min_reward"} <= set(rows[0])
    assert min(r["loss"] for r in rows[-3:]) < rows[0]["loss"]

    folder = tmp_path / "hf"
    assert main(["export", str(out), str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] != config["eos_token_id"]

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [r["prompt"] + " " + r[side] for r in held[:3] for side in ("chosen", "rejected")]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    loaded = load_reward_model(folder)
    with torch.no_grad():
        theirs = hf(**enc).logits
        ours = loaded.model.sequence_scores(loaded.params, {"input_ids": enc["input_ids"]})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
