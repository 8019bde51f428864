"""model.dtype and model.checkpoint_layers from YAML through the trainer (full and LoRA runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tscale.config import load_config
from tscale.core import tree as T
from tscale.train import train

YAML = """
run:
  threads: 1
model:
  hidden_size: 32
  intermediate_size: 64
  num_layers: 2
  num_heads: 2
  max_position_embeddings: 64
  dtype: {dtype}
  checkpoint_layers: {checkpoint}
data:
  synthetic:
    num_train: 64
    num_eval: 8
    max_items: 5
  tokenizer:
    vocab_size: 300
  batch_size: 8
  max_length: 32
optimizer:
  lr: 3.0e-3
scheduler:
  warmup_steps: 1
train:
  max_steps: 4
  log_every: 1
  progress: false
eval:
  num_samples: 4
  batch_size: 4
  max_new_tokens: 6
"""

LORA = ("lora.enabled=true", "lora.dropout=0.1", "lora.use_dora=true", "optimizer.lr=1e-2")


def _run(tmp_path: Path, name: str, *overrides: str, dtype="float32", checkpoint=False):
    path = tmp_path / f"{name}.yaml"
    path.write_text(YAML.format(dtype=dtype, checkpoint=str(checkpoint).lower()))
    cfg = load_config(path, [f"run.output_dir={tmp_path / name}", *overrides])
    result = train(cfg, console=Console(quiet=True))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], result


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpoint_layers_from_yaml_gives_the_same_run(tmp_path: Path, lora: bool):
    """Recomputing each layer in the backward changes nothing but memory, with LoRA too (its
    F.linear interception is replayed during the recomputation)."""
    extra = LORA if lora else ()
    plain_losses, plain = _run(tmp_path, "plain", *extra)
    losses, ckpt = _run(tmp_path, "ckpt", *extra, checkpoint=True)
    assert losses[0] == plain_losses[0]  # same forward, bit for bit
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-6, atol=0)
    for a, b in zip(T.leaves(ckpt.state.params), T.leaves(plain.state.params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ckpt.summary["eval"] == pytest.approx(plain.summary["eval"], rel=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dtype_from_yaml(tmp_path: Path, lora: bool):
    """bfloat16 params (and adapters, which take the base's dtype) train and evaluate; the
    losses follow the float32 run's within bf16 rounding."""
    extra = LORA if lora else ()
    fp32_losses, fp32 = _run(tmp_path, "fp32", *extra)
    bf16_losses, bf16 = _run(tmp_path, "bf16", *extra, dtype="bfloat16")
    assert {t.dtype for t in T.leaves(fp32.state.params)} == {torch.float32}
    assert {t.dtype for t in T.leaves(bf16.state.params)} == {torch.bfloat16}
    # bf16 keeps 8 bits of mantissa: the logits, hence the loss, move by ~1e-2 relative.
    torch.testing.assert_close(
        torch.tensor(bf16_losses), torch.tensor(fp32_losses), rtol=2e-2, atol=0
    )
    assert 0.0 <= bf16.summary["eval"]["exact_match"] <= 1.0
    assert bf16.summary["eval"]["loss"] == pytest.approx(fp32.summary["eval"]["loss"], rel=2e-2)
