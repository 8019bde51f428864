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
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from safetensors.torch import load_file
from tensordict import TensorDictBase
from tokenizers import Tokenizer, processors

from tscale import checkpoint as ckpt
from tscale.checkpoint.hf import CONFIG_NAME, GENERATION_CONFIG_NAME, save_pretrained
from tscale.checkpoint.peft import save_adapter
from tscale.checkpoint.sharded import is_sharded, read_params
from tscale.config.load import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.data.prompt import ChatTemplate, render_messages
from tscale.data.tokenize import BOS, EOS, PAD
from tscale.errors import CheckpointError
from tscale.models.hf import generation_config_json
from tscale.models.lora import LoraConfig
from tscale.models.transformer import TransformerConfig
from tscale.train import builders

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    CHAT_TEMPLATE_FILE,
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
"""The HF tokenizer files copied from a checkpoint into an export when present."""

# A reply no template rewrites (no spaces to trim, no special characters).
_SENTINEL = "tscaleEndOfTurnSentinel"


# ------------------------------------------------------------------------------------------
# The run's tokenizer. MERGE NOTE: read_checkpoint_tokenizer is a stand-in for the Encoder's
# folder constructor (tscale.data.tokenize.Encoder gains ``chat_template`` and a constructor from
# a tokenizer folder); at merge, replace its body by that constructor and delete
# CheckpointTokenizer. The rest of this module only reads the five fields below.
# ------------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class CheckpointTokenizer:
    """The fields of ``Encoder`` that export reads: the tokenizer, special ids, chat template."""

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None


def _token_content(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_checkpoint_tokenizer(path: str | Path) -> CheckpointTokenizer:
    """The tokenizer of a checkpoint (or HF model folder) ``path`` and its special tokens.

    With a ``tokenizer_config.json``: its ``bos_token``/``eos_token``/``pad_token`` and
    ``chat_template`` (or ``chat_template.jinja``). Without one (a checkpoint tscale wrote before
    it kept tokenizer folders): tscale's ``<|bos|>``/``<|eos|>``/``<|pad|>`` and no template.

    Raises:
        CheckpointError: no readable ``tokenizer.json``, or a named special token it lacks.
    """
    root = Path(path)
    file = root / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or bad file
        raise CheckpointError(f"{file}: cannot read the tokenizer ({e}); re-save it") from e
    cfg = _read_json(root / TOKENIZER_CONFIG)
    if cfg is not None:
        names = {k: _token_content(cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja = root / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
    else:
        names, template = {"bos": BOS, "eos": EOS, "pad": PAD}, None
    ids: dict[str, int | None] = {}
    for kind, name in names.items():
        ids[kind] = None if name is None else tok.token_to_id(name)
        if name is not None and ids[kind] is None:
            raise CheckpointError(
                f"{root}: the {kind} token {name!r} is not in tokenizer.json; fix "
                f"{TOKENIZER_CONFIG} or the tokenizer"
            )
    return CheckpointTokenizer(
        tokenizer=tok,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        chat_template=template if isinstance(template, str) and template else None,
    )


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


def _token_string(tok: Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tok.id_to_token(token_id)


def decide_token_ids(
    spec: CheckpointTokenizer, *, base_generation: Mapping[str, Any] | None = None
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
            bos_token=_token_string(tok, spec.bos_id) or "",
            eos_token=_token_string(tok, spec.eos_id) or "",
        )
        for token in end_of_turn_tokens(template, added.values()):
            stop.append(tok.token_to_id(token))
    base_eos = (base_generation or {}).get("eos_token_id")
    for i in base_eos if isinstance(base_eos, list) else [base_eos]:
        if isinstance(i, int) and i in added:
            stop.append(i)
    pad = spec.pad_id if spec.pad_id is not None else spec.eos_id
    return TokenIds(spec.bos_id, spec.eos_id, pad, tuple(dict.fromkeys(stop)))


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent (a model folder may be gone by now)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(
    source: str | Path,
    spec: CheckpointTokenizer,
    ids: TokenIds,
    out: str | Path,
    *,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write a tokenizer folder that ``AutoTokenizer`` loads into ``out``.

    Copies the HF tokenizer files ``source`` holds (:data:`TOKENIZER_FILES`) and writes
    ``tokenizer_config.json`` and ``special_tokens_map.json`` with ``ids``' bos/eos/pad (a
    source without a ``tokenizer_config.json`` gets one: tscale's tokenizer, its added tokens,
    ``model_max_length``, and a ``tokenizer.json`` that adds ``<|bos|>`` as tscale did in
    training), and ``chat_template.jinja`` when the template is known but in no file.

    Returns:
        The files written.
    """
    src, dst = Path(source), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    tok = spec.tokenizer
    written: list[Path] = []
    config = _read_json(src / TOKENIZER_CONFIG)
    for name in TOKENIZER_FILES:
        if name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP) or not (src / name).is_file():
            continue
        if (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
        written.append(dst / name)
    if config is None and ids.bos is not None and tok.post_processor is None:
        # A tokenizer tscale trained: tscale put <|bos|> before every sample it trained on, so
        # the export's tokenizer adds it too, as Llama's do (tscale encodes without it).
        # MERGE NOTE: once checkpoints hold a tokenizer_config.json for tscale's own tokenizer
        # too, the test here becomes "the Encoder prepends BOS and the tokenizer does not".
        tok = Tokenizer.from_str(tok.to_str())
        bos = tok.id_to_token(ids.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids.bos)]
        )
        tok.save(str(dst / "tokenizer.json"))
        written.append(dst / "tokenizer.json")
    elif not (src / "tokenizer.json").is_file():  # spec came from elsewhere: save its tokenizer
        tok.save(str(dst / "tokenizer.json"))
        written.append(dst / "tokenizer.json")

    special = {
        "bos_token": _token_string(tok, ids.bos),
        "eos_token": _token_string(tok, ids.eos),
        "pad_token": _token_string(tok, ids.pad),
    }
    if config is None:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(tok.get_added_tokens_decoder().items())
            },
            "unk_token": None,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
    config.update(special)
    in_file = (dst / CHAT_TEMPLATE_FILE).is_file() or "chat_template" in config
    if spec.chat_template is not None and not in_file:
        (dst / CHAT_TEMPLATE_FILE).write_text(spec.chat_template, encoding="utf-8")
        written.append(dst / CHAT_TEMPLATE_FILE)
    _write_json(dst / TOKENIZER_CONFIG, config)
    tokens_map = _read_json(src / SPECIAL_TOKENS_MAP) or {}
    tokens_map.update({k: v for k, v in special.items() if v is not None})
    _write_json(dst / SPECIAL_TOKENS_MAP, tokens_map)
    return list(dict.fromkeys([*written, dst / TOKENIZER_CONFIG, dst / SPECIAL_TOKENS_MAP]))


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
    spec = read_checkpoint_tokenizer(tokenizer_dir)
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
    write_tokenizer_files(
        tokenizer_dir, spec, ids, root, model_max_length=config.max_position_embeddings
    )
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
    vocab_size = read_checkpoint_tokenizer(path).tokenizer.get_vocab_size(with_added_tokens=True)
    init_key, _ = R.split(R.key(cfg.run.seed), 2)
    model, base = builders.build_model(cfg, vocab_size, init_key)
    if sharded:  # written by an FSDP run: DCP gathers the shards into full tensors
        params = read_params(path)
    else:
        params = T.unflatten(load_file(str(path / "params.safetensors")))
    if cfg.lora.enabled:
        params = builders.build_lora_model(cfg, model, base).merged(params)
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
    spec = read_checkpoint_tokenizer(checkpoint_dir)
    base_generation = _read_json(Path(name) / GENERATION_CONFIG_NAME) if name else None
    write_tokenizer_files(
        checkpoint_dir, spec, decide_token_ids(spec, base_generation=base_generation), root
    )
    return root


__all__ = [
    "TOKENIZER_FILES",
    "CheckpointTokenizer",
    "TokenIds",
    "decide_token_ids",
    "end_of_turn_tokens",
    "export",
    "export_adapter",
    "read_checkpoint_tokenizer",
    "resolve_checkpoint",
    "write_hf_export",
    "write_tokenizer_files",
]
