"""``tscale export``: a run or checkpoint → an HF checkpoint directory (LoRA adapters merged)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tscale import checkpoint as ckpt
from tscale.checkpoint.hf import save_pretrained
from tscale.checkpoint.sharded import is_sharded, read_params
from tscale.config.load import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.data.tokenize import Encoder, load_tokenizer
from tscale.errors import CheckpointError
from tscale.train import builders


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint directory: ``run_or_ckpt`` itself, or the newest one of a run directory."""
    path = Path(run_or_ckpt)
    if (path / "state.json").is_file():
        return path
    found = ckpt.latest_checkpoint(path / "checkpoints")
    if found is None:
        raise CheckpointError(
            f"{path}: neither a checkpoint (no state.json) nor a run directory with checkpoints/"
        )
    return found


def export(run_or_ckpt: str | Path, out: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """Write the checkpoint's model as an HF directory (config.json, safetensors, tokenizer.json)
    that ``transformers`` loads. A LoRA run is merged into its base first (the base is rebuilt
    exactly as the run built it: from ``model.path`` or the run's seed)."""
    path = resolve_checkpoint(run_or_ckpt)
    sharded = is_sharded(path)
    needed = ("config.yaml", "tokenizer.json") + (() if sharded else ("params.safetensors",))
    for name in needed:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}; was it written by tscale train?")
    cfg = load_config(path / "config.yaml")
    encoder = Encoder.from_tokenizer(load_tokenizer(path / "tokenizer.json"))
    init_key, _ = R.split(R.key(cfg.run.seed), 2)
    model, base = builders.build_model(cfg, encoder.vocab_size, init_key)
    if sharded:  # written by an FSDP run: DCP gathers the shards into full tensors
        params = read_params(path)
    else:
        params = T.unflatten(load_file(str(path / "params.safetensors")))
    if cfg.lora.enabled:
        params = builders.build_lora_model(cfg, model, base).merged(params)
    extra = {
        "bos_token_id": encoder.bos_id,
        "eos_token_id": encoder.eos_id,
        "pad_token_id": encoder.pad_id,
    }
    return save_pretrained(
        (model.config, params),
        out,
        tokenizer_files=[path / "tokenizer.json"],
        max_shard_size=max_shard_size,
        extra_config=extra,
    )
