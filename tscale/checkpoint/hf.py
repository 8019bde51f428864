"""Hugging Face checkpoint directories (config.json + safetensors) of the supported families.

:func:`from_pretrained` reads a local directory written by ``transformers`` ``save_pretrained``
(one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``) into a
:class:`~tscale.models.hf.Model`. :func:`save_pretrained` writes the reverse, which
``transformers.AutoModelForCausalLM.from_pretrained`` loads. What a checkpoint must contain and
what its config.json says is decided by the pure :mod:`tscale.models.hf` and
:mod:`tscale.models.transformer`; this module only reads and writes files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.errors import CheckpointError, ConfigError
from tscale.models.hf import (
    Model,
    check_complete,
    check_params,
    check_tensor,
    config_json,
    is_ignored,
    parse_size,
    plan_shards,
    resolve_dtype,
)
from tscale.models.transformer import TransformerConfig, param_shapes

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return [root / f for f in files]
    single = root / WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise CheckpointError(f"{root} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")


def from_pretrained(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> Model:
    """Load an HF checkpoint directory of a supported family.

    Tensors are read one at a time from the memory-mapped safetensors files and cast to ``dtype``
    on ``device`` as they are read, so peak memory is the params plus one tensor.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` (or shards plus
            ``model.safetensors.index.json``).
        dtype: the params dtype (a ``torch.dtype`` or a name like ``"bfloat16"``); None or
            ``"auto"``: the dtype in config.json (float32 when absent).
        device: where the params live.

    Returns:
        The :class:`~tscale.models.hf.Model`; its params are named like the checkpoint keys.

    Raises:
        ConfigError: the ``model_type``/``architectures`` (or a RoPE type) is unsupported; the
            message lists the supported ones.
        CheckpointError: files are missing, or a tensor is missing, unexpected or misshapen
            (the message names it).
    """
    root = Path(path)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{root} is not an HF checkpoint directory: no {CONFIG_NAME}")
    hf = read_json(config_path)
    try:
        config = TransformerConfig.from_hf_dict(hf, dtype=resolve_dtype(dtype))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e
    dev = torch.device(device)

    flat: dict[str, torch.Tensor] = {}
    for file in weight_files(root):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if is_ignored(key, config):
                    continue
                check_tensor(key, f.get_slice(key).get_shape(), config, file.name)
                t = f.get_tensor(key)
                flat[key] = t.to(device=dev, dtype=config.dtype if t.is_floating_point() else None)
    check_complete(flat, config, str(root))
    params = T.unflatten({k: flat[k] for k in param_shapes(config)})
    return Model(config=config, params=params, hf_config=hf)


def save_pretrained(
    model: Model | tuple[TransformerConfig, TensorDictBase],
    path: str | os.PathLike[str],
    *,
    tokenizer_files: Iterable[str | os.PathLike[str]] | None = None,
    max_shard_size: int | str = "5GB",
    extra_config: Mapping[str, Any] | None = None,
    base_config: Mapping[str, Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write an HF checkpoint directory that ``transformers`` and :func:`from_pretrained` load.

    Writes ``config.json`` (see :func:`tscale.models.hf.config_json`: the family's
    ``model_type``/``architectures``, the params' dtype, special token ids, the source
    config.json's other keys), ``generation_config.json`` when given, and the params as
    safetensors: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_size``. Weight files of an
    earlier save in the same directory are removed. A tied model has no ``lm_head.weight``.

    Args:
        model: a :class:`~tscale.models.hf.Model` or a ``(config, params)`` pair.
        path: the directory (created if needed).
        tokenizer_files: files to copy next to the weights (``tokenizer.json``, …).
        max_shard_size: bytes per shard, an int or a string such as ``"5GB"``/``"500MB"``.
        extra_config: more config.json entries, e.g. ``{"eos_token_id": 2, "pad_token_id": 0}``
            from the run's tokenizer; they override what ``to_hf_dict`` writes.
        base_config: the config.json the params came from, for a ``(config, params)`` pair (a
            ``Model`` brings its own ``hf_config``): its non-architecture keys are kept.
        generation_config: the contents of ``generation_config.json`` (see
            :func:`tscale.models.hf.generation_config_json`); None writes none.

    Returns:
        The directory.

    Raises:
        CheckpointError: the params do not match the config's names/shapes, or a tokenizer file
            is missing.
        ConfigError: ``max_shard_size`` is not a size.
    """
    if isinstance(model, Model):
        config, params, base = model.config, model.params, model.hf_config
    else:
        (config, params), base = model, base_config or {}
    limit = parse_size(max_shard_size)
    flat = T.flatten(params)
    check_params(config, flat)
    tokenizer_paths = checked_tokenizer_files(tokenizer_files)

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: flat[k].detach().to("cpu").contiguous() for k in param_shapes(config)}
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    hf = config_json(config, dtype, base, extra_config)

    write_folder(root, tensors, hf, limit, generation_config, tokenizer_paths)
    return root


def checked_tokenizer_files(files: Iterable[str | os.PathLike[str]] | None) -> list[Path]:
    """``files`` as paths, each checked to exist.

    Raises:
        CheckpointError: a file is missing.
    """
    paths = [Path(p) for p in files or ()]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"tokenizer file {p} does not exist")
    return paths


def write_folder(
    root: Path,
    tensors: Mapping[str, torch.Tensor],
    hf: Mapping[str, Any],
    limit: int,
    generation_config: Mapping[str, Any] | None,
    tokenizer_paths: Iterable[Path],
) -> None:
    """Write an HF folder's files into ``root`` (which exists): ``tensors`` as safetensors (one
    file, or shards of at most ``limit`` bytes plus the index; weight files of an earlier save
    removed), ``config.json`` from ``hf``, ``generation_config.json`` when given, and copies of
    the tokenizer files."""
    for old in [*root.glob("model*.safetensors"), root / INDEX_NAME]:
        if old.is_file():
            old.unlink()
    shards = plan_shards(tensors, limit)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], root / WEIGHTS_NAME, metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, root / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (root / CONFIG_NAME).write_text(json.dumps(dict(hf), indent=2) + "\n", encoding="utf-8")
    if generation_config is not None:
        text = json.dumps(dict(generation_config), indent=2) + "\n"
        (root / GENERATION_CONFIG_NAME).write_text(text, encoding="utf-8")
    for p in tokenizer_paths:
        if p.resolve() != (root / p.name).resolve():
            shutil.copy2(p, root / p.name)


__all__ = ["from_pretrained", "save_pretrained"]
