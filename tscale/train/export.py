"""``tscale export``: a run or checkpoint → a complete HF folder (LoRA adapters merged).

The folder holds what ``transformers`` needs to tokenize, chat and generate: the weights and
``config.json``, the tokenizer files with the chat template and special tokens, and
``generation_config.json``. Token ids are decided once (:func:`decide_token_ids`) and written
the same way everywhere:

- **bos / eos**: the tokenizer's (its ``tokenizer_config.json``, or tscale's ``<|bos|>``/``<|eos|>``
  for a tokenizer tscale trained).
- **end of turn**: the special token(s) the chat template writes right after an assistant reply
  (:func:`end_of_turn_tokens`: ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``…).
  ``generation_config.json`` lists them beside the eos, so ``generate`` stops at the end of the
  assistant turn even when the tokenizer's eos is another token (a base model's
  ``<|endoftext|>``).
- **pad**: the tokenizer's pad, else the eos (as ``generate`` does); written into the tokenizer
  files too, so batched ``AutoTokenizer`` calls work.

:func:`export_adapter` writes the LoRA adapter folder (PEFT's files, ``base_model_name_or_path``,
and the same tokenizer files).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from safetensors.torch import load_file
from tensordict import TensorDictBase

from tscale import checkpoint as ckpt
from tscale.checkpoint.frozen import FrozenSource, restore_frozen
from tscale.checkpoint.hf import CONFIG_NAME, GENERATION_CONFIG_NAME, save_pretrained
from tscale.checkpoint.io import read_meta
from tscale.checkpoint.peft import save_adapter
from tscale.checkpoint.reward import save_reward_pretrained
from tscale.checkpoint.sharded import is_sharded, read_params
from tscale.config.load import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.data.hf_tokenizer import load_encoder, save_tokenizer_folder
from tscale.data.prompt import ChatTemplate, render_messages
from tscale.data.tokenize import Encoder
from tscale.errors import CheckpointError
from tscale.models.hf import generation_config_json
from tscale.models.lora import LoraConfig
from tscale.models.transformer import TransformerConfig
from tscale.tasks.reward import split_score
from tscale.train import builders

# A reply no template rewrites (no spaces to trim, no special characters).
_SENTINEL = "tscaleEndOfTurnSentinel"


# ------------------------------------------------------------------------------------------
# Token ids: pure decisions
# ------------------------------------------------------------------------------------------


def end_of_turn_tokens(
    template: str | ChatTemplate, special_tokens: Iterable[str]
) -> tuple[str, ...]:
    """The special tokens a chat template writes right after an assistant reply.

    Renders ``[user "x", assistant SENTINEL]`` and reads, from just after the sentinel, the
    longest ``special_tokens`` one after another (whitespace before the first is skipped, as
    Llama 2's ``' ' + eos_token``; whitespace-only tokens never count). Pass a
    :class:`ChatTemplate` whose ``bos_token``/``eos_token`` are the tokenizer's, so templates
    that write ``eos_token`` resolve.

    Returns:
        The tokens in order (e.g. ``("<|im_end|>",)``); empty when the template fails on this
        conversation or writes no special token there.
    """
    # Whitespace tokens (some tokenizers add "\n" or runs of spaces) end no turn.
    specials = sorted({s for s in special_tokens if s.strip()}, key=len, reverse=True)
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = render_messages(template, messages)
    except Exception:  # a template that refuses this conversation (roles, system prompt …)
        return ()
    at = text.find(_SENTINEL)
    if at < 0:
        return ()
    rest = text[at + len(_SENTINEL) :]
    rest = rest[len(rest) - len(rest.lstrip()) :]
    found: list[str] = []
    while True:
        match = next((s for s in specials if rest.startswith(s)), None)
        if match is None:
            return tuple(found)
        found.append(match)
        rest = rest[len(match) :]


@attrs.frozen
class TokenIds:
    """The special token ids of an export, as every file writes them."""

    bos: int | None
    eos: int | None
    pad: int | None
    stop: tuple[int, ...]
    """``generation_config.json``'s eos ids: the eos, then the end-of-turn token(s)."""


def decide_token_ids(
    spec: Encoder, *, base_generation: Mapping[str, Any] | None = None
) -> TokenIds:
    """The export's ids: the tokenizer's bos/eos, pad (or the eos when it has none) and the
    stop ids — the eos, the template's end-of-turn tokens, and those eos ids of the source
    model's generation_config.json that are special tokens of this tokenizer (Llama 3.1's
    ``<|eom_id|>``)."""
    tok = spec.tokenizer
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    stop: list[int] = [] if spec.eos_id is None else [spec.eos_id]
    if spec.chat_template is not None:
        template = ChatTemplate.from_jinja(
            spec.chat_template,
            bos_token=spec.bos_token or "",
            eos_token=spec.eos_token or "",
        )
        for token in end_of_turn_tokens(template, added.values()):
            stop.append(tok.token_to_id(token))
    base_eos = (base_generation or {}).get("eos_token_id")
    for i in base_eos if isinstance(base_eos, list) else [base_eos]:
        if isinstance(i, int) and i in added:
            stop.append(i)
    return TokenIds(spec.bos_id, spec.eos_id, spec.pad_id, tuple(dict.fromkeys(stop)))


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def read_tokenizer(path: str | Path) -> Encoder:
    """The tokenizer of a checkpoint (or HF folder) ``path`` with its special tokens and chat
    template: the folder tscale wrote, or the bare ``tokenizer.json`` of an older checkpoint."""
    return load_encoder(path, key=f"the tokenizer of {path}")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent (a model folder may be gone by now)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else None


def write_hf_export(
    config: TransformerConfig,
    params: TensorDictBase,
    out: str | Path,
    *,
    tokenizer_dir: str | Path,
    base_dir: str | Path | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the complete HF folder of ``(config, params)`` with the tokenizer of
    ``tokenizer_dir`` (a checkpoint directory or an HF folder).

    ``base_dir`` is the HF folder the model was trained from (``model.path``): its config.json's
    non-architecture keys and its generation_config.json's settings (temperature, top_p …) are
    kept when the folder still exists.
    """
    spec = read_tokenizer(tokenizer_dir)
    base = Path(base_dir) if base_dir is not None else None
    base_config = _read_json(base / CONFIG_NAME) if base else None
    base_generation = _read_json(base / GENERATION_CONFIG_NAME) if base else None
    ids = decide_token_ids(spec, base_generation=base_generation)
    root = save_pretrained(
        (config, params),
        out,
        max_shard_size=max_shard_size,
        base_config=base_config,
        extra_config={"bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad},
        generation_config=generation_config_json(
            bos_id=ids.bos, eos_ids=ids.stop, pad_id=ids.pad, base=base_generation
        ),
    )
    if spec.model_max_length is None:
        spec = attrs.evolve(spec, model_max_length=config.max_position_embeddings)
    save_tokenizer_folder(spec, root)
    return root


def reward_pad(spec: Encoder, ids: TokenIds) -> tuple[int, str]:
    """The pad ``(id, token)`` of a reward-model export: a token no scored sequence ends with.

    HF's sequence classifier scores the rightmost token that is not ``pad_token_id``; sequences
    end with the eos or an end-of-turn token, so the pad must be none of those (a pad that is
    the eos would make HF score the token before it). The tokenizer's own pad when it has one
    that is not a stop id; else its first added special token (by id) that is neither BOS nor a
    stop id (Qwen2's ``<|endoftext|>`` beside eos ``<|im_end|>``).

    Raises:
        CheckpointError: the tokenizer has no such token.
    """
    stops = {*ids.stop, *(() if ids.eos is None else (ids.eos,))}
    if not spec.pad_is_eos and spec.pad_id not in stops:
        token = spec.pad_token or spec.tokenizer.id_to_token(spec.pad_id)
        return spec.pad_id, token
    added = spec.tokenizer.get_added_tokens_decoder()
    for i in sorted(added):
        if added[i].special and i not in stops and i != spec.bos_id and added[i].content.strip():
            return i, added[i].content
    raise CheckpointError(
        "a reward-model export needs a pad token that is not the eos (HF would score the token "
        "before EOS), and this tokenizer has none: add one (data.tokenizer.add_tokens) and train "
        "with it"
    )


def write_reward_export(
    config: TransformerConfig,
    params: TensorDictBase,
    out: str | Path,
    *,
    tokenizer_dir: str | Path,
    base_dir: str | Path | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the HF ``<Family>ForSequenceClassification`` folder of a reward model's params
    (the decoder without ``lm_head``, plus ``score.weight``) with the tokenizer of
    ``tokenizer_dir``, its pad set to :func:`reward_pad` in config.json and in the tokenizer
    files (so ``AutoTokenizer`` pads with it and the classifier skips it). No
    generation_config.json: the folder scores, it does not generate."""
    spec = read_tokenizer(tokenizer_dir)
    base = Path(base_dir) if base_dir is not None else None
    base_config = _read_json(base / CONFIG_NAME) if base else None
    base_generation = _read_json(base / GENERATION_CONFIG_NAME) if base else None
    ids = decide_token_ids(spec, base_generation=base_generation)
    pad_id, pad_token = reward_pad(spec, ids)
    root = save_reward_pretrained(
        config,
        params,
        out,
        pad_id=pad_id,
        max_shard_size=max_shard_size,
        base_config=base_config,
        extra_config={"bos_token_id": ids.bos, "eos_token_id": ids.eos},
    )
    spec = attrs.evolve(spec, pad_id=pad_id, pad_token=pad_token, pad_is_eos=False)
    if spec.model_max_length is None:
        spec = attrs.evolve(spec, model_max_length=config.max_position_embeddings)
    save_tokenizer_folder(spec, root)
    return root


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
    """Write the checkpoint's model as a complete HF folder (see the module doc) that
    ``transformers`` loads. A LoRA run is merged into its base first (the base is rebuilt
    exactly as the run built it: from ``model.path`` or the run's seed)."""
    path = resolve_checkpoint(run_or_ckpt)
    sharded = is_sharded(path)
    needed = ("config.yaml", "tokenizer.json") + (() if sharded else ("params.safetensors",))
    for name in needed:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}; was it written by tscale train?")
    cfg = load_config(path / "config.yaml")
    vocab_size = read_tokenizer(path).vocab_size
    init_key, _ = R.split(R.key(cfg.run.seed), 2)
    reward = getattr(cfg.task, "head", "lm") == "score"  # a score head (a reward model)
    model, base = builders.build_model(cfg, vocab_size, init_key, reward=reward)
    if sharded:  # written by an FSDP run: DCP gathers the shards into full tensors
        params = read_params(path)
    else:
        params = T.unflatten(load_file(str(path / "params.safetensors")))
    only = getattr(cfg.task, "export_params", None)  # the task's own trees stay out (PPO's value)
    if only is not None:
        params = only(params)
    if cfg.lora.enabled:  # the base as the run used it: its folder (checked), saved or rebuilt
        head: TensorDictBase | None = None
        if reward:  # the score head trains beside the adapters; the base is the decoder alone
            (params, head), (base, _) = split_score(params), split_score(base)
        stacked, base_tree = builders.build_lora_model(cfg, model, base)
        sources = {"base": FrozenSource.of(cfg.model.path)} if cfg.model.path else {}
        frozen = restore_frozen(path, read_meta(path), {"base": base_tree}, sources)
        params = stacked.merged(params, frozen=frozen)
        if head is not None:
            params = T.combine(params, head)
    if reward:
        return write_reward_export(
            model.config,
            params,
            out,
            tokenizer_dir=path,
            base_dir=cfg.model.path,
            max_shard_size=max_shard_size,
        )
    return write_hf_export(
        model.config,
        params,
        out,
        tokenizer_dir=path,
        base_dir=cfg.model.path,
        max_shard_size=max_shard_size,
    )


def export_adapter(
    adapters: TensorDictBase,
    config: LoraConfig,
    out: str | Path,
    *,
    checkpoint_dir: str | Path | None,
    base_model: str | None,
) -> Path:
    """Write the PEFT adapter folder of a LoRA run, with the run's tokenizer files beside it.

    ``base_model_name_or_path`` is ``base_model`` (the run's ``model.path``) made absolute when
    it is a local folder; a run from random init has no HF base and records null (use
    ``tscale export`` for a merged model).
    """
    name = None
    if base_model is not None:
        local = Path(base_model)
        name = str(local.resolve()) if local.is_dir() else base_model
    root = save_adapter(adapters, config, out, base_model_name_or_path=name)
    if checkpoint_dir is None:  # no checkpoint was written: nothing to take the tokenizer from
        return root
    save_tokenizer_folder(read_tokenizer(checkpoint_dir), root)
    return root


__all__ = [
    "TokenIds",
    "decide_token_ids",
    "end_of_turn_tokens",
    "export",
    "export_adapter",
    "read_tokenizer",
    "resolve_checkpoint",
    "reward_pad",
    "write_hf_export",
    "write_reward_export",
]
