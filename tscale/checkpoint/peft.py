"""LoRA adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A directory written by :func:`save_adapter` loads with ``peft.PeftModel.from_pretrained(model,
path)`` onto a ``transformers`` model holding the same base weights, and :func:`load_adapter`
reads adapters that PEFT saved (LoRA, DoRA, rsLoRA; no biases, per-module ranks or
``modules_to_save``). Tensor names get PEFT's ``base_model.model.`` prefix on disk:
``model.layers.0.self_attn.q_proj.lora_A.weight`` is stored as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.errors import CheckpointError
from tscale.models.lora import LoraConfig, from_peft_config, to_peft_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(
    adapters: TensorDictBase,
    config: LoraConfig,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write ``adapters`` and ``config`` to the directory ``path`` in PEFT's layout.

    Args:
        adapters: the tree from :func:`~tscale.models.lora.init_lora` (or a trained one).
        config: its LoRA hyper-parameters.
        path: a directory (created if missing; existing files of the same names are replaced).
        base_model_name_or_path: recorded in ``adapter_config.json`` for PEFT's auto classes.
        task_type: PEFT's task type (``"CAUSAL_LM"`` gives a ``PeftModelForCausalLM``).

    Returns:
        The directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = to_peft_config(
        config, adapters, base_model_name_or_path=base_model_name_or_path, task_type=task_type
    )
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in T.flatten(adapters).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(
    path: str | Path, *, device: torch.device | str = "cpu"
) -> tuple[TensorDict, LoraConfig]:
    """Read a PEFT LoRA adapter directory (ours or PEFT's) into ``(adapters, config)``.

    Raises:
        CheckpointError: a file is missing, or the adapter uses a PEFT feature tscale does
            not implement (the message names it).
    """
    d = Path(path)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p} not found: {d} is not a PEFT adapter directory")
    try:
        config = from_peft_config(json.loads(cfg_path.read_text()))
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    flat = {}
    for k, v in load_file(str(w_path), device=str(device)).items():
        name = k.removeprefix(PREFIX)
        # PEFT files carry no adapter name; tolerate ones saved with ".default." in them.
        flat[
            name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        ] = v
    if not flat:
        raise CheckpointError(f"{w_path} holds no tensors")
    return T.unflatten(flat), config


__all__ = ["CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "load_adapter", "save_adapter"]
