"""Reward-model folders: load a decoder with a ``score`` head, write ``*ForSequenceClassification``.

:func:`load_reward_model` reads an HF ``<Family>ForSequenceClassification`` folder (its
``score.weight``) or a ``<Family>ForCausalLM`` folder (the decoder; the LM head is skipped and
the score head is new, initialised as HF does: Normal(0, ``initializer_range``)).
:func:`save_reward_pretrained` writes the folder ``transformers``'
``AutoModelForSequenceClassification`` loads: ``architectures`` the family's
sequence-classification class, ``id2label``/``label2id`` for ``num_labels``, ``pad_token_id``
(required: HF's last-token rule reads it), ``score.weight`` and no ``lm_head``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import safe_open
from tensordict import TensorDict, TensorDictBase

from tscale.checkpoint.hf import (
    CONFIG_NAME,
    checked_tokenizer_files,
    read_json,
    weight_files,
    write_folder,
)
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.errors import CheckpointError, ConfigError
from tscale.models.families import TABLE
from tscale.models.hf import check_tensor, config_json, is_ignored, parse_size, resolve_dtype
from tscale.models.reward import (
    SCORE_WEIGHT,
    RewardHead,
    RewardModel,
    check_reward_params,
    family_of_architecture,
    init_score,
    reward_architecture,
    reward_param_shapes,
)
from tscale.models.transformer import Transformer, TransformerConfig

__all__ = ["RewardCheckpoint", "load_reward_model", "reward_config_json", "save_reward_pretrained"]

# config.json keys of a classification head that the export writes afresh.
_LABEL_KEYS = ("num_labels", "id2label", "label2id")


@attrs.frozen(eq=False)
class RewardCheckpoint:
    """A loaded reward model: the decoder's config, the params (no ``lm_head``, with
    ``score.weight``), the config.json as read, and whether the head is new (the folder was a
    causal LM)."""

    config: TransformerConfig
    params: TensorDict
    hf_config: Mapping[str, Any]
    num_labels: int
    new_head: bool

    @property
    def pad_id(self) -> int | None:
        """config.json's ``pad_token_id`` (None when it has none)."""
        pad = self.hf_config.get("pad_token_id")
        return int(pad) if isinstance(pad, int) else None

    @property
    def model(self) -> RewardModel:
        """The reward model over the plain decoder."""
        head = RewardHead.of(self.config, num_labels=self.num_labels, pad_id=self.pad_id)
        return RewardModel(Transformer(self.config), head)


def _num_labels(hf: Mapping[str, Any]) -> int:
    """HF's ``num_labels``: the size of ``id2label``, else ``num_labels``, else 2 (HF's)."""
    id2label = hf.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    return int(hf.get("num_labels", 2))


def load_reward_model(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    key: torch.Tensor | None = None,
    num_labels: int = 1,
) -> RewardCheckpoint:
    """Load a reward model from an HF folder (see the module docstring).

    Args:
        path: a ``*ForSequenceClassification`` or ``*ForCausalLM`` folder of a supported family.
        dtype: the params dtype (None or ``"auto"``: the file's).
        device: where the params live.
        key: the key of a new head (a causal-LM folder); default ``rng.key(0)``.
        num_labels: the new head's rows (a sequence-classification folder brings its own).

    Raises:
        ConfigError: an unsupported family or architecture.
        CheckpointError: files or tensors missing, unexpected or misshapen.
    """
    root = Path(path)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{root} is not an HF checkpoint directory: no {CONFIG_NAME}")
    hf = read_json(config_path)
    archs = hf.get("architectures") or []
    family = family_of_architecture(archs[0]) if archs else None
    as_lm = dict(hf)
    if family is not None:  # read the decoder's config as its causal LM's
        as_lm["architectures"] = [TABLE[family].architecture]
        num_labels = _num_labels(hf)
    try:
        config = TransformerConfig.from_hf_dict(as_lm, dtype=resolve_dtype(dtype))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from e
    expected = reward_param_shapes(config, num_labels)
    dev = torch.device(device)
    flat: dict[str, torch.Tensor] = {}
    for file in weight_files(root):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if is_ignored(name, config) or name == "lm_head.weight":
                    continue  # a reward model has no LM head
                shape = tuple(f.get_slice(name).get_shape())
                if name == SCORE_WEIGHT:
                    if shape != expected[SCORE_WEIGHT]:
                        raise CheckpointError(
                            f"{file.name}: {SCORE_WEIGHT} has shape {shape}, config.json implies "
                            f"{expected[SCORE_WEIGHT]}"
                        )
                else:
                    check_tensor(name, shape, config, file.name)
                t = f.get_tensor(name)
                flat[name] = t.to(device=dev, dtype=config.dtype if t.is_floating_point() else None)
    new_head = SCORE_WEIGHT not in flat
    if new_head:
        if family is not None:
            raise CheckpointError(f"{root}: missing tensors ['{SCORE_WEIGHT}']")
        flat[SCORE_WEIGHT] = init_score(
            key if key is not None else R.key(0),
            config.hidden_size,
            num_labels=num_labels,
            std=config.init_std,
            dtype=config.dtype,
            device=dev,
        )
    missing = [k for k in expected if k not in flat]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{root}: missing tensors {missing[:5]}{more}")
    params = T.unflatten({k: flat[k] for k in expected})
    return RewardCheckpoint(config, params, hf, num_labels, new_head)


def reward_config_json(
    config: TransformerConfig,
    dtype: torch.dtype | None,
    *,
    pad_id: int,
    num_labels: int = 1,
    base: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a reward-model export: :func:`tscale.models.hf.config_json`, then the
    family's sequence-classification architecture, ``id2label``/``label2id`` for
    ``num_labels`` and ``pad_token_id``.

    Raises:
        CheckpointError: ``pad_id`` is one of the eos ids (HF would score the token before EOS).
    """
    hf = config_json(
        config, dtype, {k: v for k, v in (base or {}).items() if k not in _LABEL_KEYS}, extra
    )
    hf["architectures"] = [reward_architecture(config.family)]
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    eos = hf.get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if pad_id in eos_ids:
        raise CheckpointError(
            f"pad_token_id {pad_id} is the eos id: HF's sequence classifier would score the "
            "token before EOS; give the export a pad id of its own"
        )
    hf["pad_token_id"] = int(pad_id)
    return hf


def save_reward_pretrained(
    config: TransformerConfig,
    params: TensorDictBase,
    path: str | os.PathLike[str],
    *,
    pad_id: int,
    num_labels: int = 1,
    tokenizer_files: Iterable[str | os.PathLike[str]] | None = None,
    max_shard_size: int | str = "5GB",
    base_config: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the ``<Family>ForSequenceClassification`` folder of a reward model's params (see
    the module docstring); ``base_config``/``extra_config``/``generation_config`` as in
    :func:`tscale.checkpoint.hf.save_pretrained`.

    Raises:
        CheckpointError: the params are not the reward model's (names, shapes), the pad id is
            an eos id, or a tokenizer file is missing.
    """
    limit = parse_size(max_shard_size)
    flat = T.flatten(params)
    check_reward_params(config, flat, num_labels)
    tokenizer_paths = checked_tokenizer_files(tokenizer_files)
    names = reward_param_shapes(config, num_labels)
    tensors = {k: flat[k].detach().to("cpu").contiguous() for k in names}
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    hf = reward_config_json(
        config, dtype, pad_id=pad_id, num_labels=num_labels, base=base_config, extra=extra_config
    )
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    write_folder(root, tensors, hf, limit, generation_config, tokenizer_paths)
    return root
