"""Hugging Face tokenizer folders in and out: :func:`load_encoder`, :func:`save_tokenizer_folder`.

A folder is what ``transformers``' ``save_pretrained`` writes: ``tokenizer.json`` (the fast
tokenizer, added tokens included), ``tokenizer_config.json`` (``bos_token``/``eos_token``/
``pad_token``/``unk_token`` as strings or ``AddedToken`` dicts, a ``chat_template`` string or
list), ``special_tokens_map.json`` and, since transformers 4.43,
``chat_template.jinja``. Everything is read with ``tokenizers`` and ``json``; ``transformers``
is not needed. tscale's own BPE is just another folder: :func:`save_tokenizer_folder` writes its
``tokenizer_config.json``, and a bare tscale ``tokenizer.json`` (checkpoints written before
folders) still loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from tokenizers import AddedToken, Tokenizer, processors

from tscale.data.prompt import config_chat_template, token_string
from tscale.data.tokenize import SPECIAL_TOKENS, Encoder
from tscale.errors import DataError

TOKEN_KEYS: tuple[str, ...] = ("bos_token", "eos_token", "pad_token", "unk_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length for "no limit"


def _read_json(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{key}: {path} is not a JSON object")
    return data


def read_chat_template(folder: Path, config: Mapping[str, Any], key: str) -> str | None:
    """The folder's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``, else ``chat_template.json`` (older processors); None when none."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    source = config_chat_template(config, where=str(folder / "tokenizer_config.json"), key=key)
    if source is None:
        other = folder / "chat_template.json"
        source = config_chat_template(_read_json(other, key), where=str(other), key=key)
    return source


def post_processor_adds(tokenizer: Tokenizer, token_id: int | None) -> tuple[bool, bool]:
    """Whether encoding with special tokens puts ``token_id`` first, and whether it puts it last
    (the post-processor adds BOS / EOS), found by encoding a short text both ways."""
    if token_id is None:
        return False, False
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    first = full[:1] == [token_id] and plain[:1] != [token_id]
    last = full[-1:] == [token_id] and plain[-1:] != [token_id]
    return first, last


def load_encoder(path: str | Path, *, key: str = "data.tokenizer.path") -> Encoder:
    """An :class:`~tscale.data.tokenize.Encoder` for an HF tokenizer folder (or the
    ``tokenizer.json`` inside one), or for a bare tscale ``tokenizer.json``.

    Special tokens come from ``tokenizer_config.json`` (then ``special_tokens_map.json``); a
    missing pad token falls back to eos (``pad_is_eos``). The tokenizer adds BOS (``adds_bos``)
    when its post-processor does (``add_bos_token`` is not read, as in transformers 5).

    Args:
        key: the YAML key the path came from, named in every error.

    Raises:
        DataError: no such path, no ``tokenizer.json``, an unreadable file, a special token that
            is not in the vocabulary, no eos token, or a bare ``tokenizer.json`` that is not
            tscale's (its special tokens cannot be known).
    """
    p = Path(path)
    if p.is_dir():
        folder: Path | None = p
        tok_file = p / "tokenizer.json"
    elif p.is_file():
        tok_file = p
        folder = p.parent if (p.parent / "tokenizer_config.json").is_file() else None
    else:
        raise DataError(
            f"{key}: {p} not found; give an HF tokenizer folder (tokenizer.json + "
            "tokenizer_config.json) or a tokenizer.json"
        )
    if not tok_file.is_file():
        raise DataError(
            f"{key}: {p} has no tokenizer.json; tscale reads fast tokenizers: write one with "
            "transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
        )
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a plain Exception on a bad file
        raise DataError(f"{key}: cannot read tokenizer {tok_file}: {e}") from e
    config = _read_json(folder / "tokenizer_config.json", key) if folder else {}
    smap = _read_json(folder / "special_tokens_map.json", key) if folder else {}
    if folder is not None and not config and not smap:
        folder = None  # a checkpoint written before folders: a bare tscale tokenizer.json
    if folder is None:
        if all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS):
            return Encoder.from_tokenizer(tok, source=str(p))  # a tscale BPE (older checkpoints)
        raise DataError(
            f"{key}: {p} is a bare tokenizer.json without tscale's special tokens "
            f"{list(SPECIAL_TOKENS)}, so its bos/eos/pad tokens are unknown: give its HF "
            "tokenizer folder (with tokenizer_config.json) instead"
        )
    tokens: dict[str, str | None] = {}
    ids: dict[str, int | None] = {}
    for name in TOKEN_KEYS:
        value = config[name] if name in config else smap.get(name)
        tokens[name] = token_string(value)
        ids[name] = None if tokens[name] is None else tok.token_to_id(tokens[name])
        if tokens[name] is not None and ids[name] is None:
            raise DataError(
                f"{key}: {name} {tokens[name]!r} of {folder} is not in its tokenizer.json"
            )
    eos_id = ids["eos_token"]
    if eos_id is None:
        raise DataError(
            f"{key}: {folder} names no eos_token; tscale ends every sample with it: set "
            "eos_token in its tokenizer_config.json"
        )
    pad_is_eos = ids["pad_token"] is None
    pad_id = eos_id if pad_is_eos else ids["pad_token"]
    bos_id = ids["bos_token"]
    # tokenizer.json's post-processor decides, as in transformers 5 (whose fast tokenizers no
    # longer read add_bos_token; folders saved by transformers 4 agree with their flag).
    adds_bos = post_processor_adds(tok, bos_id)[0]
    limit = config.get("model_max_length")
    return Encoder(
        tok,
        pad_id=pad_id,  # type: ignore[arg-type]  # eos_id is an int here
        bos_id=bos_id,
        eos_id=eos_id,
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["eos_token"] if pad_is_eos else tokens["pad_token"],
        unk_token=tokens["unk_token"],
        adds_bos=adds_bos,
        pad_is_eos=pad_is_eos,
        chat_template=read_chat_template(folder, config, key),
        model_max_length=limit if isinstance(limit, int) and limit < _VERY_LARGE_INTEGER else None,
        source=str(p),
    )


def add_tokens(encoder: Encoder, tokens: Sequence[str]) -> Encoder:
    """``encoder`` with ``tokens`` added as special tokens (those it has are kept as they are),
    in order, so they get the next free ids. The tokenizer is copied, not changed."""
    new = [t for t in dict.fromkeys(tokens) if encoder.tokenizer.token_to_id(t) is None]
    if not new:
        return encoder
    tok = Tokenizer.from_str(encoder.tokenizer.to_str())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return attrs.evolve(encoder, tokenizer=tok)


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    out = {}
    for tid, t in sorted(tok.get_added_tokens_decoder().items()):
        out[str(tid)] = {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
    return out


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenizer_config(encoder: Encoder) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of ``encoder`` (HF keys; ``PreTrainedTokenizerFast``)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens_decoder(encoder.tokenizer),
        **encoder.special_tokens,
        "model_max_length": encoder.model_max_length or _VERY_LARGE_INTEGER,
        "clean_up_tokenization_spaces": False,
    }
    if encoder.chat_template is not None:
        config["chat_template"] = encoder.chat_template
    return config


def save_tokenizer_folder(encoder: Encoder, directory: str | Path) -> dict[str, Path]:
    """Write ``encoder`` as a complete HF tokenizer folder that ``AutoTokenizer`` loads with the
    same special tokens, BOS behaviour and chat template, and that :func:`load_encoder` reads
    back as the same encoder.

    Files: ``tokenizer.json`` (its post-processor set to add BOS exactly when the encoder does,
    e.g. for tscale's BPE), ``tokenizer_config.json``, ``special_tokens_map.json`` and, when there
    is a template, ``chat_template.jinja``. Each is written atomically.

    Returns:
        ``{file name: path}`` of the files written (the checkpoint's ``files=``).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = encoder.tokenizer
    if encoder.adds_bos != post_processor_adds(tok, encoder.bos_id)[0]:
        # The file's post-processor must say what the encoder does (tscale's BPE adds BOS).
        tok = Tokenizer.from_str(tok.to_str())
        bos = encoder.bos_token
        if encoder.adds_bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, encoder.bos_id)],
            )
        else:
            tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    files = {
        "tokenizer.json": out / "tokenizer.json",
        "tokenizer_config.json": out / "tokenizer_config.json",
        "special_tokens_map.json": out / "special_tokens_map.json",
    }
    _write(files["tokenizer.json"], tok.to_str(pretty=True))
    config = tokenizer_config(encoder)
    _write(files["tokenizer_config.json"], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    smap = {k: v for k, v in encoder.special_tokens.items() if v is not None}
    _write(files["special_tokens_map.json"], json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
    jinja = out / CHAT_TEMPLATE_FILE
    if encoder.chat_template is not None:
        _write(jinja, encoder.chat_template)
        files[CHAT_TEMPLATE_FILE] = jinja
    else:
        jinja.unlink(missing_ok=True)
    return files


__all__ = [
    "CHAT_TEMPLATE_FILE",
    "TOKEN_KEYS",
    "add_tokens",
    "load_encoder",
    "post_processor_adds",
    "read_chat_template",
    "save_tokenizer_folder",
    "tokenizer_config",
]
