"""tscale export: a run becomes an HF directory transformers loads; training resumes from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tscale.config import load_config
from tscale.errors import ConfigError
from tscale.testing.runs import TINY_DATA, TINY_MODEL
from tscale.train import train

transformers = pytest.importorskip("transformers")

TINY = [
    *TINY_MODEL,
    *TINY_DATA,
    "model.tie_word_embeddings=false",
    "scheduler.warmup_steps=2",
    "train.max_steps=6",
    "train.log_every=3",
    "train.progress=false",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.num_show=0",
]


def _export(run: Path, out: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tscale.cli", "export", str(run), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr


def _hf_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True])
def test_export_loads_in_transformers_with_the_same_logits(lora: bool, tmp_path: Path):
    extra = ["lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2"] if lora else []
    result = train(
        load_config(None, [*TINY, f"run.output_dir={tmp_path / 'run'}", *extra]),
        console=Console(quiet=True),
    )
    out = tmp_path / "hf"
    _export(tmp_path / "run", out)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    from tscale.train import builders

    cfg = load_config(tmp_path / "run" / "config.yaml")
    if lora:  # merged adapters = the LoRA model's own forward
        from tscale.core import rng as R

        model, base = builders.build_model(cfg, 300, R.split(R.key(0), 2)[0])
        stacked, base = builders.build_lora_model(cfg, model, base)
        expected = stacked.apply(result.state.params, {"input_ids": ids}, frozen={"base": base})
    else:
        model, _ = builders.build_model(cfg, 300, torch.zeros(2, dtype=torch.int64))
        expected = model.apply(result.state.params, {"input_ids": ids})
    torch.testing.assert_close(_hf_logits(out, ids), expected.detach(), atol=1e-4, rtol=1e-4)


def test_training_starts_from_an_exported_checkpoint(tmp_path: Path):
    train(
        load_config(None, [*TINY, f"run.output_dir={tmp_path / 'a'}"]), console=Console(quiet=True)
    )
    _export(tmp_path / "a", tmp_path / "hf")
    arch = [o for o in TINY if o.startswith("model.")]
    rest = [o for o in TINY if not o.startswith("model.")]
    base = [
        *rest,
        f"model.path={tmp_path / 'hf'}",
        f"data.tokenizer.path={tmp_path / 'hf' / 'tokenizer.json'}",
    ]
    second = train(
        load_config(None, [*base, f"run.output_dir={tmp_path / 'b'}"]), console=Console(quiet=True)
    )

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    # b starts where a ended (trained weights), not from a random init.
    assert losses("b")[0] < losses("a")[0] - 0.1
    assert second.final_step == 6
    with pytest.raises(ConfigError, match=r"model\.hidden_size conflicts with model\.path"):
        train(
            load_config(None, [*base, arch[0], f"run.output_dir={tmp_path / 'c'}"]),
            console=Console(quiet=True),
        )
