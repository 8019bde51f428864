"""The pure side of Hugging Face checkpoints: the loaded-model record, name checks, config.json.

:class:`Model` is what :func:`tscale.checkpoint.hf.from_pretrained` returns: the
:class:`~tscale.models.transformer.TransformerConfig`, a params tree named exactly like the
checkpoint keys, and the model functions bound to the config. The functions here decide what a
checkpoint must contain and what its config.json says; the file reading and writing lives in
:mod:`tscale.checkpoint.hf` (the models package does no I/O, as the PEFT adapter split does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.errors import CheckpointError, ConfigError
from tscale.models.transformer import (
    _DTYPES,
    Batch,
    Transformer,
    TransformerConfig,
    param_shapes,
)

# Tensors some checkpoints carry that are not parameters (recomputed buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Keys of config.json that are not architecture but belong to the checkpoint.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Keys of a source config.json not carried into an export: older spellings of what
# ``to_hf_dict`` writes (``torch_dtype``; ``rope_theta``/``rope_scaling``, now in
# ``rope_parameters``), settings the exported dense weights no longer have
# (``quantization_config``), remote code (``auto_map``: the family's own class loads the export)
# and the source's bookkeeping.
_NOT_CARRIED = frozenset(
    {
        "torch_dtype",
        "rope_theta",
        "rope_scaling",
        "partial_rotary_factor",
        "quantization_config",
        "auto_map",
        "_name_or_path",
        "transformers_version",
    }
)
# Keys of a source generation_config.json that the export rewrites or drops.
_GENERATION_NOT_CARRIED = frozenset({*TOKEN_KEYS, "transformers_version", "_from_model_config"})


@attrs.frozen(eq=False)
class Model:
    """A loaded checkpoint: the config, the params, and the model functions bound to the config.

    ``hf_config`` is the config.json as read (special token ids and other non-architecture
    keys); ``save_pretrained`` carries its token ids over.
    """

    config: TransformerConfig
    params: TensorDict
    hf_config: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def transformer(self) -> Transformer:
        """The pure model record (``init``/``apply``/``apply_with_cache`` bound to the config)."""
        return Transformer(self.config)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids of config.json (``eos_token_id``: an int or a list)."""
        eos = self.hf_config.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's final logit soft-cap (None for other families)."""
        return self.config.final_logit_softcap

    def init(self, key: torch.Tensor, **kw: Any) -> TensorDict:
        """Fresh params of this architecture (see :meth:`Transformer.init`)."""
        return self.transformer.init(key, **kw)

    def apply(self, params: TensorDictBase, batch: Batch, **kw: Any) -> torch.Tensor:
        """Logits [B, S, V] (see :func:`tscale.models.transformer.apply`); ``gather``/``frozen``
        as in :mod:`tscale.models.protocol`."""
        return self.transformer.apply(params, batch, **kw)

    def hidden_states(self, params: TensorDictBase, batch: Batch, **kw: Any) -> torch.Tensor:
        """Final-normed hidden states [B, S, H]."""
        return self.transformer.hidden_states(params, batch, **kw)

    def head_weight(self, params: TensorDictBase, **kw: Any) -> torch.Tensor:
        """The LM head's weight [V, H], tied or not."""
        return self.transformer.head_weight(params, **kw)

    def logits_from_hidden(
        self, params: TensorDictBase, h: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        """The LM head (with Gemma 2's final soft-cap)."""
        return self.transformer.logits_from_hidden(params, h, **kw)

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        **kw: Any,
    ) -> TensorDict:
        """An empty KV cache (see :func:`tscale.models.transformer.init_cache`)."""
        return self.transformer.init_cache(batch_size, max_length, dtype=dtype, device=device, **kw)

    def apply_with_cache(
        self, params: TensorDictBase, batch: Batch, cache: TensorDictBase, offset: int, **kw: Any
    ) -> tuple[torch.Tensor, TensorDictBase]:
        """Logits of new tokens against the cache, and the cache."""
        return self.transformer.apply_with_cache(params, batch, cache, offset, **kw)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or its name; None for None or ``"auto"`` (the file's).

    Raises:
        ConfigError: an unknown or non-float name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def is_ignored(key: str, config: TransformerConfig) -> bool:
    """Whether a checkpoint tensor is skipped: a RoPE buffer, or a tied head HF drops too."""
    return bool(_IGNORED.match(key)) or (key == "lm_head.weight" and config.tie_word_embeddings)


def check_tensor(key: str, shape: Iterable[int], config: TransformerConfig, where: str) -> None:
    """Raise if a checkpoint tensor is not a parameter of ``config`` or has the wrong shape.

    Raises:
        CheckpointError: naming the tensor, the file (``where``) and the expected shape.
    """
    expected = param_shapes(config)
    if key not in expected:
        raise CheckpointError(
            f"{where}: unexpected tensor {key!r} for a {config.family} model with this "
            f"config.json (is it the right architecture?)"
        )
    shape = tuple(shape)
    if shape != expected[key]:
        raise CheckpointError(
            f"{where}: tensor {key!r} has shape {shape}, config.json implies {expected[key]}"
        )


def check_complete(names: Iterable[str], config: TransformerConfig, where: str) -> None:
    """Raise if parameters of ``config`` are missing from ``names``.

    Raises:
        CheckpointError: listing the first missing tensors.
    """
    have = set(names)
    missing = [k for k in param_shapes(config) if k not in have]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}{more}")


def check_params(config: TransformerConfig, flat: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``flat`` holds exactly the parameters of ``config``, in their shapes.

    Raises:
        CheckpointError: unexpected or missing names (e.g. unmerged adapters), or a shape.
    """
    expected = param_shapes(config)
    unknown = [k for k in flat if k not in expected]
    missing = [k for k in expected if k not in flat]
    if unknown or missing:
        raise CheckpointError(
            f"params do not match the {config.family} config: unexpected {unknown[:5]}, "
            f"missing {missing[:5]} (merge adapters into the base weights before exporting)"
        )
    for k, shape in expected.items():
        if tuple(flat[k].shape) != shape:
            raise CheckpointError(f"param {k!r} has shape {tuple(flat[k].shape)}, not {shape}")


def config_json(
    config: TransformerConfig,
    dtype: torch.dtype | None,
    base: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of an export: ``config.to_hf_dict()``, the params' dtype, token ids.

    ``base`` is the config.json the model was loaded from (``Model.hf_config``), if any: its keys
    that are not architecture (``use_cache``, ``attention_dropout``, token ids, …) are kept, the
    architecture is always ``config``'s, and older spellings of architecture keys
    (``torch_dtype``, ``rope_theta``, ``rope_scaling``) and ``quantization_config``/``auto_map``
    are dropped. Token ids come from ``base``, then ``extra``; those absent are written as null
    rather than left to the family's defaults, which would claim ids of a tokenizer the run may
    not use. ``extra`` overrides everything.
    """
    hf = {k: v for k, v in (base or {}).items() if k not in _NOT_CARRIED}
    hf.update(config.to_hf_dict())
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    for key in TOKEN_KEYS:
        hf[key] = (base or {}).get(key)
    hf.update(extra or {})
    return hf


def generation_config_json(
    *,
    bos_id: int | None,
    eos_ids: Iterable[int],
    pad_id: int | None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The generation_config.json of an export.

    ``base`` is the source model's generation_config.json, if any: its settings (``do_sample``,
    ``temperature``, ``top_p``, …) are kept and its token ids replaced. ``eos_token_id`` is the
    one id of ``eos_ids`` or the list of them (duplicates dropped, order kept: ``generate`` stops
    at any); ``pad_token_id`` is ``pad_id``, or the first eos id when there is none (what
    ``generate`` falls back to, written out so it does not warn).
    """
    eos = list(dict.fromkeys(int(e) for e in eos_ids))
    out = {k: v for k, v in (base or {}).items() if k not in _GENERATION_NOT_CARRIED}
    out["bos_token_id"] = bos_id
    out["eos_token_id"] = (eos[0] if len(eos) == 1 else eos) if eos else None
    out["pad_token_id"] = pad_id if pad_id is not None else (eos[0] if eos else None)
    return out


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"1GiB"``.

    Raises:
        ConfigError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 1024")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return n


def plan_shards(flat: Mapping[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most ``limit`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in flat.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


__all__ = [
    "TOKEN_KEYS",
    "Model",
    "check_complete",
    "check_params",
    "check_tensor",
    "config_json",
    "generation_config_json",
    "is_ignored",
    "parse_size",
    "plan_shards",
    "resolve_dtype",
]
