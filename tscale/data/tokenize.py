"""tscale's byte-level BPE (trained on the data and cached) and the :class:`Encoder`: a tokenizer
with its special tokens and BOS rule (from an HF tokenizer folder, see
:mod:`tscale.data.hf_tokenizer`, or tscale's BPE) that turns records into ids and pre-shifted
labels."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tscale.core.result import Err, Ok
from tscale.data.load import validate_record
from tscale.errors import DataError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, padding, the last position)."""

# Bump when train_tokenizer changes, so cached tokenizers trained the old way are not reused.
_TRAINER_VERSION = "bpe-bytelevel-v1"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the special tokens ``<|pad|> <|bos|> <|eos|>``.

    The alphabet holds all 256 bytes, so any text encodes; no prefix space is added, so
    ``decode(encode(x)) == x``. Special tokens get ids 0, 1, 2.

    Raises:
        DataError: ``vocab_size`` too small for the byte alphabet and the special tokens.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise DataError(
            f"vocab_size {vocab_size} is too small: the byte alphabet and special tokens alone "
            f"take {smallest}; use at least {smallest} (a few hundred more to learn merges)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _fingerprint(files: Sequence[Path], vocab_size: int) -> str:
    """sha256 of the files' contents (in order, length-prefixed), the vocab size and trainer."""
    h = hashlib.sha256(f"{_TRAINER_VERSION}\0{vocab_size}\0{len(files)}\0".encode())
    for path in files:
        h.update(f"{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _texts(files: Sequence[Path]) -> Iterator[str]:
    """``prompt + completion`` of every JSON-lines row that has both as strings, and the text of
    every chat turn (``messages``: content, ``conversations``: value); others are skipped:
    rejecting rows is :func:`tscale.data.load.load_records`'s job."""
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(row, dict):
                    continue
                p, c = row.get("prompt"), row.get("completion")
                if isinstance(p, str) and isinstance(c, str):
                    yield p + c
                for key, field in (("messages", "content"), ("conversations", "value")):
                    turns = row.get(key)
                    if isinstance(turns, list):
                        yield from (
                            t[field]
                            for t in turns
                            if isinstance(t, dict) and isinstance(t.get(field), str)
                        )


def _check_special_tokens(tok: Tokenizer, source: str) -> None:
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise DataError(
            f"tokenizer {source} lacks the special token(s) {missing}; tscale needs "
            f"{list(SPECIAL_TOKENS)} in a bare tokenizer.json: give the tokenizer's HF folder "
            "(tokenizer.json + tokenizer_config.json naming its bos/eos/pad tokens) instead"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` and check it has tscale's special tokens.

    Raises:
        DataError: the file is missing or unreadable, or a special token is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on a bad file
        raise DataError(f"cannot read tokenizer {path}: {e}; it must be a tokenizer.json") from e
    _check_special_tokens(tok, str(path))
    return tok


def load_or_train_tokenizer(
    path: str | Path | None,
    texts_files: Sequence[Path],
    vocab_size: int,
    cache_dir: Path,
) -> Tokenizer:
    """The tokenizer at ``path``; or one trained on ``texts_files`` and cached in ``cache_dir``.

    The cache file is ``cache_dir/tokenizer-<fingerprint>.json``; the fingerprint is a sha256 of
    the files' contents and ``vocab_size``, so the same data loads the same tokenizer again and
    changed data trains a new one. Training texts are ``prompt + completion`` of each JSON line.

    Raises:
        DataError: a missing or unusable tokenizer file, missing training files, or no texts.
    """
    if path is not None:
        return load_tokenizer(path)
    files = [Path(f) for f in texts_files]
    if not files:
        raise DataError("no tokenizer path and no training files to train one on")
    for f in files:
        if not f.is_file():
            raise DataError(f"tokenizer training file not found: {f}")
    cached = Path(cache_dir) / f"tokenizer-{_fingerprint(files, vocab_size)}.json"
    if cached.is_file():
        return load_tokenizer(cached)
    texts = list(_texts(files))
    if not texts:
        raise DataError(
            "no rows with string 'prompt' and 'completion' (or chat 'messages') in "
            f"{[str(f) for f in files]} to train a tokenizer on"
        )
    tok = train_tokenizer(texts, vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees the old state or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tok


@attrs.frozen(eq=False)
class Encoder:
    """A tokenizer with its special tokens; turns records into ``input_ids`` and ``labels``.

    Labels are pre-shifted: ``labels[t]`` is the token the model should predict at position
    ``t``, i.e. ``input_ids[t + 1]`` when that token belongs to the completion or is the final
    ``eos``, else ``-100``. The loss compares ``logits[t]`` with ``labels[t]``, no shift.

    The special tokens come from the tokenizer folder (:meth:`from_path`) or, for tscale's own
    BPE, are ``<|pad|> <|bos|> <|eos|>`` (:meth:`from_tokenizer`). ``bos_id`` is None for a
    tokenizer without BOS (Qwen2); ``pad_id`` is ``eos_id`` when the folder names no pad token
    (``pad_is_eos``). ``adds_bos`` says whether the tokenizer itself puts BOS before a text
    (its post-processor, or ``add_bos_token`` in its config; tscale's BPE declares it): that is
    the one rule for BOS everywhere (see :func:`tscale.data.prompt.tokenize_encoded`).
    ``chat_template`` is the Jinja2 source the run renders with (the folder's own, until the
    builders replace it by the template the run trains with; None: no template).
    """

    tokenizer: Tokenizer
    pad_id: int
    bos_id: int | None
    eos_id: int
    bos_token: str | None = attrs.field(default=None, kw_only=True)
    eos_token: str | None = attrs.field(default=None, kw_only=True)
    pad_token: str | None = attrs.field(default=None, kw_only=True)
    unk_token: str | None = attrs.field(default=None, kw_only=True)
    adds_bos: bool = attrs.field(default=True, kw_only=True)
    pad_is_eos: bool = attrs.field(default=False, kw_only=True)
    chat_template: str | None = attrs.field(default=None, kw_only=True)
    model_max_length: int | None = attrs.field(default=None, kw_only=True)
    source: str | None = attrs.field(default=None, kw_only=True)
    """Where the tokenizer came from (a path), for error messages."""

    def __attrs_post_init__(self) -> None:
        # Token strings default to the tokenizer's strings of the ids (frozen: set once here).
        for name, tid in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if getattr(self, f"{name}_token") is None and tid is not None:
                object.__setattr__(self, f"{name}_token", self.tokenizer.id_to_token(tid))
        if self.bos_id is None and self.adds_bos:
            object.__setattr__(self, "adds_bos", False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, source: str | None = None) -> Encoder:
        """An encoder for tscale's own BPE (``<|pad|> <|bos|> <|eos|>``, BOS before every
        sample). Raises DataError when a special token is missing."""
        _check_special_tokens(tokenizer, source or "given")
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        return cls(tokenizer, pad_id=ids[0], bos_id=ids[1], eos_id=ids[2], source=source)

    @classmethod
    def from_path(cls, path: str | Path, *, key: str = "data.tokenizer.path") -> Encoder:
        """An encoder for an HF tokenizer folder, a ``tokenizer.json`` in such a folder, or a bare
        tscale ``tokenizer.json`` (see :func:`tscale.data.hf_tokenizer.load_encoder`); ``key``
        is the YAML key named in errors."""
        from tscale.data.hf_tokenizer import load_encoder

        return load_encoder(path, key=key)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """``{"bos_token", "eos_token", "pad_token", "unk_token"}`` strings (None: none)."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token, or None."""
        return None if self.unk_token is None else self.tokenizer.token_to_id(self.unk_token)

    @property
    def vocab_size(self) -> int:
        """The largest token id + 1 (special and added tokens included): the embedding rows the
        tokenizer needs."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def _bos(self) -> list[int]:
        return [self.bos_id] if self.adds_bos and self.bos_id is not None else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _assemble(
        self,
        record: dict[str, Any],
        prompt_ids: list[int],
        completion_ids: list[int],
        max_length: int,
        where: str | None,
    ) -> Ok[dict] | Err:
        bos = self._bos()
        if bos and prompt_ids[:1] == bos:
            bos = []  # never a BOS twice
        ids = [*bos, *prompt_ids, *completion_ids, self.eos_id]
        if len(ids) > max_length:
            return Err(f"too long: {len(ids)} tokens > max_length {max_length}", record, where)
        # Position t predicts ids[t + 1]; it is trained when ids[t + 1] is completion or eos,
        # i.e. t + 1 >= first, the index of the first completion token.
        first = len(bos) + len(prompt_ids)
        first = max(first, 1)  # the first token is no one's target
        labels = [IGNORE_INDEX] * (first - 1) + ids[first:] + [IGNORE_INDEX]
        if all(x == IGNORE_INDEX for x in labels):  # unreachable while eos is a label; a guard
            return Err("no trained tokens (all labels masked)", record, where)
        return Ok({"input_ids": ids, "labels": labels})

    def encode_example(
        self, record: dict[str, Any], max_length: int, where: str | None = None
    ) -> Ok[dict] | Err:
        """``Ok({"input_ids", "labels"})`` for one record, or ``Err`` (too long, bad fields).

        ``input_ids = [bos] + prompt + completion + [eos]`` (bos when the tokenizer adds one);
        prompt and completion are tokenized separately, so the label boundary is exact. Nothing
        is truncated here.
        """
        checked = validate_record(record, where)
        if isinstance(checked, Err):
            return checked
        p, c = self._ids(record["prompt"]), self._ids(record["completion"])
        return self._assemble(record, p, c, max_length, where)

    def encode_batch(
        self,
        records: Sequence[dict[str, Any]],
        max_length: int,
        where: Sequence[str | None] | None = None,
    ) -> list[Ok[dict] | Err]:
        """:meth:`encode_example` for many records, tokenized in parallel (``encode_batch``).

        Args:
            where: the place of each record (``"file.jsonl:row 3"``), for the ``Err`` results.
        """
        places = list(where) if where is not None else [None] * len(records)
        if len(places) != len(records):
            raise ValueError(f"{len(places)} places for {len(records)} records")
        out: list[Ok[dict] | Err | None] = [None] * len(records)
        good: list[int] = []
        for i, rec in enumerate(records):
            checked = validate_record(rec, places[i])
            if isinstance(checked, Err):
                out[i] = checked
            else:
                good.append(i)
        enc = self.tokenizer.encode_batch
        prompts = enc([records[i]["prompt"] for i in good], add_special_tokens=False)
        completions = enc([records[i]["completion"] for i in good], add_special_tokens=False)
        for i, p, c in zip(good, prompts, completions, strict=True):
            out[i] = self._assemble(records[i], p.ids, c.ids, max_length, places[i])
        return out  # type: ignore[return-value]  # every slot is filled above

    def encode_prompt(self, prompt: str) -> list[int]:
        """``[bos] + prompt ids`` (bos when the tokenizer adds one and the text does not start
        with it): the input from which a completion is generated."""
        ids = self._ids(prompt)
        bos = self._bos()
        return ids if not bos or ids[:1] == bos else [*bos, *ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens (pad, bos, eos, …) left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
