"""configs/lora_quickstart.yaml and configs/qlora_quickstart.yaml run as the docs say: from an
exported base through model.path, training only adapters (a tiny base and few steps here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tscale.config import load_config
from tscale.core import tree as T
from tscale.train import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=8",
    "data.batch_size=8",
    "train.max_steps=3",
    "scheduler.warmup_steps=1",
    "train.save_every=0",
    "train.eval_every=0",
    "train.progress=false",
    "run.threads=1",
    "eval.num_samples=4",
    "eval.max_new_tokens=8",
]


@pytest.mark.parametrize("name", ["lora_quickstart", "qlora_quickstart"])
def test_adapter_config_trains_from_the_exported_base(tmp_path: Path, base_export: Path, name):
    if name.startswith("qlora"):
        pytest.importorskip("bitsandbytes")
    cfg = load_config(
        ROOT / "configs" / f"{name}.yaml",
        [
            *SMALL,
            f"model.path={base_export}",
            f"data.tokenizer.path={base_export / 'tokenizer.json'}",
            f"run.output_dir={tmp_path}",
        ],
    )
    assert cfg.lora.enabled and cfg.lora.qlora == name.startswith("qlora")
    result = train(cfg, console=Console(quiet=True))
    names = T.leaf_keys(result.state.params)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert 0.0 <= result.summary["eval"]["exact_match"] <= 1.0
