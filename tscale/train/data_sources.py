"""The data section's I/O: sources read and mixed, the processed-data cache, the error budget.

Used by :func:`tscale.train.data_build.build_data`; configs stop here (house rule 2), the library
pieces (:mod:`tscale.data.sources`, :mod:`tscale.data.introspect`) take plain arguments.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from tscale.config.load import to_dict
from tscale.config.schema import Config, DataConfig
from tscale.core.result import Err, Ok
from tscale.data.introspect import RECORD_SHAPES, SourceInfo, canonical_row, detect_format
from tscale.data.length import TEXT_COLUMNS, LengthBudget
from tscale.data.load import (
    Row,
    all_bad_error,
    preference_row,
    read_file,
    record_of,
    write_quarantine,
)
from tscale.data.sources import (
    fingerprint,
    is_hub_name,
    load_source,
    mix_sources,
    resolve_source,
)
from tscale.data.tokenize import train_tokenizer
from tscale.errors import ConfigError, DataError

CACHE_VERSION = "tscale-processed-v4"
"""Bump when the processing changes, so caches made the old way are not read back."""

# Data keys that change how batches are drawn, not what the processed examples are.
_LOADER_ONLY = (
    "batch_size",
    "shuffle",
    "group_by_length",
    "longest_first",
    "max_tokens",
    "drop_last",
)
_NOT_PROCESSING = (*_LOADER_ONLY, "cache", "cache_dir", "max_error_rate", "streaming")
_SUPPORTED_FORMATS = RECORD_SHAPES
_SAMPLE_ROWS = 200  # rows a source's format is detected on
DROPPED_FILE = "dropped.jsonl"
"""Beside quarantine.jsonl: the rows the length policy left out (data.length.excess drop, or
nothing trainable fits), one ``{"where", "reason", "record"}`` a line."""


@attrs.frozen
class Source:
    """One resolved training (or eval) source: what to read and the YAML key it comes from."""

    key: str  # "data.sources[0]" or "data.train_files"
    name: str  # shown in "where" places: a path, a hub name
    spec: Any  # for load_source: a path, a list of paths, or a hub name
    split: str
    weight: float
    column_map: Mapping[str, str]
    format: str
    hub_config: str | None = None


def uses_sources(d: DataConfig) -> bool:
    """Whether the training data is read as sources (every row canonicalized, mixed by weight,
    streamed) rather than as ``train_files`` records kept in tscale's own shapes."""
    return bool(d.sources) or d.format != "auto" or bool(d.column_map) or d.streaming


def train_sources(d: DataConfig, train_files: Sequence[Path]) -> list[Source]:
    """The training sources: ``data.sources``, else ``data.train_files`` as one source."""
    if not d.sources:
        spec = [str(p) for p in train_files]
        return [
            Source(
                "data.train_files", _files_name(spec), spec, "train", 1.0, d.column_map, d.format
            )
        ]
    out = []
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if (s.path is None) == (s.hf is None):
            raise ConfigError(f"{key}: set exactly one of path and hf")
        if s.weight <= 0:
            raise ConfigError(f"{key}.weight must be positive, got {s.weight}")
        fmt = s.format if s.format != "auto" else d.format
        name = s.path if s.path is not None else s.hf
        out.append(
            Source(
                key,
                str(name),
                name,
                s.split,
                s.weight,
                {**d.column_map, **s.column_map},
                fmt,
                s.hf_config,
            )
        )
    return out


def eval_source(d: DataConfig, eval_files: Sequence[Path]) -> Source | None:
    """``data.eval_files`` as one source read like the training data, or None."""
    if not eval_files:
        return None
    spec = [str(p) for p in eval_files]
    return Source("data.eval_files", _files_name(spec), spec, "train", 1.0, d.column_map, d.format)


def _files_name(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"


def source_files(sources: Sequence[Source]) -> list[Path]:
    """The local files behind the sources (hub sources have none), for fingerprints."""
    out: list[Path] = []
    for s in sources:
        if isinstance(s.spec, str) and is_hub_name(s.spec) and not Path(s.spec).exists():
            continue  # a hub dataset: its name, split and config are in the fingerprint
        try:
            resolved = resolve_source(s.spec)
        except DataError as e:
            raise DataError(f"{s.key}: {e}") from None
        if resolved.kind == "saved" and resolved.path is not None:
            out += sorted(p for p in resolved.path.rglob("*") if p.is_file())
        out += list(resolved.files)
    return out


def _load(s: Source, *, streaming: bool, cache_dir: Path) -> Any:
    try:
        return load_source(
            s.spec, split=s.split, streaming=streaming, cache_dir=cache_dir, config=s.hub_config
        )
    except DataError as e:
        raise DataError(f"{s.key}: {e}") from None


def _local_files(s: Source) -> list[Path] | None:
    """The files of a local source's split (read by :func:`tscale.data.load.read_file`), or
    None for a hub dataset, a ``save_to_disk`` folder or a sliced split (read by ``datasets``)."""
    if isinstance(s.spec, str) and is_hub_name(s.spec) and not Path(s.spec).exists():
        return None
    try:
        resolved = resolve_source(s.spec)
    except DataError as e:
        raise DataError(f"{s.key}: {e}") from None
    base = re.split(r"[\[+]", s.split, maxsplit=1)[0].strip()
    if resolved.kind != "files" or base != s.split:
        return None
    if base not in resolved.data_files:
        raise DataError(
            f"{s.key}: {s.name} has no split {base!r}; its splits are "
            f"{sorted(resolved.data_files)} (file names starting with train/validation/test "
            "name the split)"
        )
    return list(resolved.data_files[base])


def source_rows(s: Source, *, streaming: bool, cache_dir: Path) -> Iterator[Row]:
    """The rows of a source, each ``(Ok(row) | Err, where)``: local files through the one
    reader (a bad line is an ``Err`` at ``file:line N``), others through ``datasets``."""
    files = _local_files(s)
    if files is None:
        ds = _load(s, streaming=streaming, cache_dir=cache_dir)
        for i, row in enumerate(ds):
            yield Ok(dict(row)), f"{s.name}:row {i + 1}"
        return
    for f in files:
        try:
            rows = read_file(f, cache_dir=cache_dir)
            yield from rows
        except DataError as e:
            raise DataError(f"{s.key}: {e}") from None


def _info(
    s: Source, sample: Sequence[Mapping[str, Any]], columns: Sequence[str] = ()
) -> SourceInfo:
    """The detected format and column mapping of a source, or a ConfigError naming its keys.

    ``columns``: the source's columns when known (a ``datasets`` table), else the keys of the
    sample rows in the order first seen."""
    if not columns:
        columns = list(dict.fromkeys(k for row in sample for k in row))
    try:
        fmt, mapping = detect_format(columns, sample, column_map=s.column_map, format=s.format)
    except DataError as e:
        raise ConfigError(f"{s.key}: {e} (set {s.key}.column_map / format)") from None
    if fmt not in _SUPPORTED_FORMATS:
        what = "no known columns" if fmt == "unknown" else f"format {fmt!r}"
        raise ConfigError(
            f"{s.key}: {s.name} has {what} (columns {list(columns)}); tscale reads "
            f"{list(_SUPPORTED_FORMATS)}. Map your columns with column_map, e.g. "
            "{prompt: question, completion: answer}"
        )
    return SourceInfo(
        spec=s.name,
        kind="files",
        builder=None,
        configs=(),
        config=None,
        splits={},
        split=s.split,
        columns=tuple(columns),
        features={},
        format=fmt,
        column_map=mapping,
        sample_size=len(sample),
    )


def _sample(s: Source, *, streaming: bool, cache_dir: Path) -> list[dict]:
    rows = source_rows(s, streaming=streaming, cache_dir=cache_dir)
    good = (row.value for row, _ in rows if isinstance(row, Ok))
    return list(itertools.islice(good, _SAMPLE_ROWS))


@attrs.frozen
class SourceRead:
    """A source read whole: its good rows canonicalized, its bad ones, the counts."""

    records: list[dict]
    places: list[str]
    errors: list[Err]
    rows: int
    shapes: dict[str, int]


def read_source(
    s: Source,
    *,
    cache_dir: Path,
    quarantine: Path | None = None,
    own_shapes: bool = False,
) -> SourceRead:
    """All rows of a source as records; a bad row is an ``Err`` with its place, written to
    ``quarantine``.

    With ``own_shapes`` (``data.train_files`` without ``format``/``column_map``/``streaming``)
    a row in tscale's own shape is kept as it is and any other is canonicalized in its own shape
    (:func:`tscale.data.load.record_of`); else the source's format is detected on its first rows
    and each row canonicalized (in its own shape when it does not fit, ``format: auto``).

    Raises:
        DataError: a source without rows, or a file none of whose rows is usable (naming the
            key, the file, the count, the first bad place and the quarantine file).
    """
    rows = list(source_rows(s, streaming=False, cache_dir=cache_dir))
    if not rows:
        raise DataError(f"{s.key}: {s.name} has no rows")
    info = None
    if not own_shapes:
        sample = [row.value for row, _ in rows if isinstance(row, Ok)][:_SAMPLE_ROWS]
        info = _info(s, sample) if sample else None
    records, places, errors, shapes = [], [], [], Counter()
    for row, where in rows:
        if isinstance(row, Err):
            errors.append(row)
            continue
        if info is None:
            res, shape = record_of(row.value, where)
        else:
            res, shape = canonical_row(row.value, info, where=where, per_row=s.format == "auto")
        if isinstance(res, Ok):
            records.append(res.value)
            places.append(where)
            shapes[shape] += 1
        else:
            errors.append(res)
    if quarantine is not None:
        write_quarantine(errors, quarantine)
    _some_usable(s, [w for _, w in rows], errors, quarantine)
    return SourceRead(records, places, errors, len(rows), dict(shapes))


def _some_usable(
    s: Source, places: Sequence[str], errors: Sequence[Err], quarantine: Path | None
) -> None:
    """Raise when every row of one of the source's files is bad (almost always a format
    mistake, not bad luck)."""
    if not errors:
        return

    def file_of(where: str | None) -> str:
        return (where or "").rpartition(":")[0] or s.name

    rows = Counter(file_of(w) for w in places)
    bad: dict[str, list[Err]] = {}
    for e in errors:
        bad.setdefault(file_of(e.where), []).append(e)
    for file, errs in bad.items():
        if len(errs) == rows[file]:
            raise all_bad_error(f"{s.key} ({file})", errs, len(errs), quarantine)


def mixed_order(sizes: Sequence[int], weights: Sequence[float], seed: int) -> list[tuple[int, int]]:
    """``(source, index)`` pairs of a weighted mixture of in-memory sources, via mix_sources."""
    import datasets

    parts = [
        (datasets.Dataset.from_dict({"s": [i] * n, "r": list(range(n))}), w)
        for i, (n, w) in enumerate(zip(sizes, weights, strict=True))
        if n
    ]
    if not parts:
        return []
    mixed = mix_sources(parts, seed=seed, streaming=False)
    return list(zip(mixed["s"], mixed["r"], strict=True))


def open_stream(
    sources: Sequence[Source], *, seed: int, cache_dir: Path, quarantine: Path | None = None
) -> Iterator[tuple[Ok[dict] | Err, str]]:
    """The training rows of one pass over the mixed sources, canonicalized, with their places.

    Every source is read lazily (the one reader for local files, ``datasets`` streaming for
    the hub); the mixture is ``mix_sources`` over streams of one schema (source index, place,
    the row as JSON, the reason when it is bad), so rows of different formats interleave, each
    is canonicalized with its own source's mapping, and a bad line comes out as an ``Err``.

    Raises:
        DataError: a source without one usable row (its rows are written to ``quarantine``).
    """
    import datasets

    infos = []
    for s in sources:
        sample = _sample(s, streaming=True, cache_dir=cache_dir)
        if not sample:
            bad = [r for r, _ in source_rows(s, streaming=True, cache_dir=cache_dir)]
            errors = [r for r in bad if isinstance(r, Err)]
            if not errors:
                raise DataError(f"{s.key}: {s.name} has no rows")
            if quarantine is not None:
                write_quarantine(errors, quarantine)
            raise all_bad_error(f"{s.key} ({s.name})", errors, len(bad), quarantine)
        infos.append(_info(s, sample))

    def rows_of(i: int) -> Iterator[dict]:
        for row, where in source_rows(sources[i], streaming=True, cache_dir=cache_dir):
            bad = isinstance(row, Err)
            value = row.record if isinstance(row, Err) else row.value
            yield {
                "s": i,
                "where": where,
                "row": json.dumps(value, ensure_ascii=False, default=str),
                "err": row.reason if isinstance(row, Err) else "",
                "bad": bad,
            }

    parts = [
        (datasets.IterableDataset.from_generator(rows_of, gen_kwargs={"i": i}), s.weight)
        for i, s in enumerate(sources)
    ]
    mixed = mix_sources(parts, seed=seed, streaming=True)
    for item in mixed:
        s, where, value = sources[item["s"]], item["where"], json.loads(item["row"])
        if item["bad"]:
            yield Err(item["err"], value, where), where
            continue
        res, _ = canonical_row(value, infos[item["s"]], where=where, per_row=s.format == "auto")
        yield res, where


def tokenizer_texts(records: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The texts of canonical records, to train a tokenizer on."""
    for r in records:
        if isinstance(r.get("messages"), list):
            yield from (
                m["content"]
                for m in r["messages"]
                if isinstance(m, dict) and isinstance(m.get("content"), str)
            )
            continue
        if isinstance(r.get("conversations"), list):  # ShareGPT rows kept as they are
            turns = r["conversations"]
            yield from (
                t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)
            )
            continue
        if preference_row(r):  # preference: every string or message content
            yield from _preference_texts(r)
            continue
        yield "".join(str(r.get(c) or "") for c in TEXT_COLUMNS if isinstance(r.get(c), str))


def _preference_texts(record: Mapping[str, Any]) -> Iterator[str]:
    for key in ("system", "prompt", "chosen", "rejected", "completion"):
        value = record.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (
                m["content"]
                for m in value
                if isinstance(m, dict) and isinstance(m.get("content"), str)
            )


_PROMPT_SIDE = ("prompt", "instruction", "input")


def length_budget(d: DataConfig, *, packed: bool = True) -> LengthBudget | None:
    """The length budget every record is fitted to: ``data.length`` and ``data.max_length``
    (the tighter of the two token limits; ``data.max_length`` is left to the packer when
    ``data.packing.split_overflow`` splits long examples and ``packed``: False for eval
    examples, which are never packed), or None when no limit applies. Names are checked here."""
    lc = d.length
    split = packed and d.packing.enabled and d.packing.split_overflow
    limits = [(lc.max_total_length, "data.length.max_total_length")]
    if not split:
        limits.append((d.max_length, "data.max_length"))
    limits = [(n, key) for n, key in limits if n is not None]
    if not limits and not lc.per_column_limits:
        return None
    for key, names in (
        ("per_column_limits", list(lc.per_column_limits)),
        ("column_strategy", list(lc.column_strategy)),
        ("column_side", list(lc.column_side)),
        ("priority", list(lc.priority or [])),
        ("ratios", list(lc.ratios or {})),
    ):
        bad = [n for n in names if n not in TEXT_COLUMNS]
        if bad:
            raise ConfigError(
                f"data.length.{key}: {bad} are not text columns; use {list(TEXT_COLUMNS)} "
                "(a chat's last user message and assistant turn are fitted as prompt and "
                "completion)"
            )
    if lc.max_total_length is not None and lc.max_total_length < 1:
        raise ConfigError(f"data.length.max_total_length must be >= 1, got {lc.max_total_length}")
    for c, n in lc.per_column_limits.items():
        if n < 0:
            raise ConfigError(f"data.length.per_column_limits.{c} must be >= 0, got {n}")
    if lc.content_distribution == "priority" and not lc.priority:
        raise ConfigError(
            "data.length.content_distribution priority needs data.length.priority (the text "
            "columns, most important first)"
        )
    if lc.content_distribution == "ratio" and not lc.ratios:
        raise ConfigError(
            "data.length.content_distribution ratio needs data.length.ratios (a share per column)"
        )
    for c, r in (lc.ratios or {}).items():
        if not r > 0:
            raise ConfigError(f"data.length.ratios.{c} must be positive, got {r}")
    limit, limit_name = min(limits) if limits else (None, "data.max_length")

    def side(c: str) -> str:
        if lc.side != "auto":
            return lc.side
        return "left" if c in _PROMPT_SIDE else "right"

    return LengthBudget(
        max_total_length=limit,
        limit_name=limit_name,
        per_column_limits=dict(lc.per_column_limits),
        strategy={c: lc.column_strategy.get(c, lc.strategy) for c in TEXT_COLUMNS},
        sides={c: lc.column_side.get(c, side(c)) for c in TEXT_COLUMNS},
        content_distribution=lc.content_distribution,
        priority=list(lc.priority) if lc.priority else None,
        ratios=dict(lc.ratios) if lc.ratios else None,
        excess=lc.excess,
    )


# --------------------------------------------------------------------------------------------
# Error budget
# --------------------------------------------------------------------------------------------


class ErrorBudget:
    """Counts quarantined training rows (by reason); raises once their share exceeds
    data.max_error_rate. Dropped rows (the length policy's) are not errors and not counted."""

    # A stream is judged only after this many rows (a bad first row is not yet a rate).
    MIN_ROWS = 100

    def __init__(self, max_rate: float | None, quarantine: Path) -> None:
        if max_rate is not None and not 0.0 <= max_rate <= 1.0:
            raise ConfigError(f"data.max_error_rate must be in [0, 1], got {max_rate}")
        self.max_rate = max_rate
        self.quarantine = quarantine
        self.rows = 0
        self.bad = 0
        self.reasons: Counter[str] = Counter()

    def add(self, rows: int, bad: int, reasons: Mapping[str, int] | None = None) -> None:
        """Count ``rows`` read, ``bad`` of them quarantined (``reasons``: counts by reason)."""
        self.rows += rows
        self.bad += bad
        self.reasons.update(reasons or {})

    def check(self, *, final: bool) -> None:
        """Raise DataError when over the budget (``final``: all rows are in; else a stream)."""
        if self.max_rate is None or not self.rows or (not final and self.rows < self.MIN_ROWS):
            return
        rate = self.bad / self.rows
        if rate > self.max_rate:
            top = ", ".join(f"{r} ({n})" for r, n in self.reasons.most_common(3))
            raise DataError(
                f"{self.bad} of {self.rows} training rows ({rate:.1%}) were quarantined, more "
                f"than data.max_error_rate {self.max_rate:g} ({self.max_rate:.1%})"
                f"{f'; top reasons: {top}' if top else ''}; the rows and reasons are in "
                f"{self.quarantine}. Fix the data (or data.column_map / data.loss_mode / "
                "data.template), or raise data.max_error_rate (null: never stop)"
            )


# --------------------------------------------------------------------------------------------
# Processed-data cache
# --------------------------------------------------------------------------------------------

_FIELDS = (
    "input_ids",
    "labels",
    "position_ids",
    "doc_ids",
    "branch_ids",
    "record_ids",
    "margins",
)
_FLOAT_FIELDS = frozenset({"margins"})  # float64 in the cache (a reward pair's margin)


def processed_fingerprint(
    cfg: Config,
    tokenizer_json: str,
    files: Sequence[Path],
    *,
    template: Any = None,
    encoder: Any = None,
) -> str:
    """A fingerprint of everything the processed examples depend on: the processing part of
    ``data:``, the seed, the tokenizer's JSON, the input files and, when given, the template
    (its source, bound special tokens and ``strftime_now`` date: a ``.jinja`` file or the
    tokenizer folder's template can change while the config stays the same) and the encoder's
    special tokens and BOS rule."""
    data = to_dict(cfg.data)
    for key in _NOT_PROCESSING:
        data.pop(key, None)
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "data": data,
        "seed": cfg.run.seed,  # synthetic data and the mixture order
        "tokenizer": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        "task": to_dict(cfg.task),  # its example stage makes the examples
    }
    if template is not None:
        parts["template"] = {
            "source": hashlib.sha256(template.source.encode("utf-8")).hexdigest(),
            "bos_token": template.bos_token,
            "eos_token": template.eos_token,
            "date": template.date,
        }
    if encoder is not None:
        parts["special"] = {
            **encoder.special_tokens,
            "ids": [encoder.bos_id, encoder.eos_id, encoder.pad_id],
            "adds_bos": encoder.adds_bos,
        }
    return fingerprint(parts, files)


def _flatten(examples: Sequence[Mapping[str, Sequence[int]]], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lengths = np.fromiter((len(e["input_ids"]) for e in examples), np.int64, len(examples))
    out[f"{prefix}lengths"] = lengths
    for name in _FIELDS:
        if examples and name in examples[0]:
            dtype = np.float64 if name in _FLOAT_FIELDS else np.int64
            out[f"{prefix}{name}"] = np.fromiter(
                (x for e in examples for x in e[name]), dtype, int(lengths.sum())
            )
    return out


def _unflatten(arrays: Mapping[str, np.ndarray], prefix: str) -> list[dict]:
    lengths = arrays[f"{prefix}lengths"]
    cuts = np.cumsum(lengths)[:-1]
    fields = {
        n: np.split(arrays[f"{prefix}{n}"], cuts) for n in _FIELDS if f"{prefix}{n}" in arrays
    }
    return [{n: parts[i].tolist() for n, parts in fields.items()} for i in range(len(lengths))]


COLUMNS = "columns"
"""An example's optional non-token entry: its record's columns (a JSON object), kept beside the
token arrays (online RL's rewards read them host-side by the example's ``record_ids``)."""


def _write_columns(path: Path, examples: Sequence[Mapping]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e.get(COLUMNS), ensure_ascii=False, default=str) + "\n")


def _read_columns(path: Path, examples: list[dict]) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != len(examples):
        raise ValueError(f"{path}: {len(lines)} rows for {len(examples)} examples")
    for e, line in zip(examples, lines, strict=True):
        e[COLUMNS] = json.loads(line)


def save_processed(
    folder: Path,
    *,
    train: Sequence[Mapping],
    eval_examples: Sequence[Mapping],
    meta: Mapping[str, Any],
    quarantine: Path,
) -> None:
    """Write the processed data to ``folder`` atomically (a temporary folder, then renamed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        arrays = {**_flatten(train, "train_"), **_flatten(eval_examples, "eval_")}
        np.savez(tmp / "examples.npz", **arrays)
        for prefix, examples in (("train_", train), ("eval_", eval_examples)):
            if examples and COLUMNS in examples[0]:  # online RL: the records' columns
                _write_columns(tmp / f"{prefix}{COLUMNS}.jsonl", examples)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, default=str))
        for side_file in (quarantine, quarantine.with_name(DROPPED_FILE)):
            if side_file.exists():
                shutil.copyfile(side_file, tmp / side_file.name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_processed(folder: Path, quarantine: Path) -> tuple[list[dict], list[dict], dict] | None:
    """``(train, eval, meta)`` from a cache folder, or None when there is none (a miss)."""
    if not (folder / "meta.json").is_file() or not (folder / "examples.npz").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "examples.npz") as z:
            arrays = {k: z[k] for k in z.files}
        train, eval_examples = _unflatten(arrays, "train_"), _unflatten(arrays, "eval_")
        for prefix, examples in (("train_", train), ("eval_", eval_examples)):
            _read_columns(folder / f"{prefix}{COLUMNS}.jsonl", examples)
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is a miss: it is rebuilt
    if (folder / "quarantine.jsonl").is_file():
        shutil.copyfile(folder / "quarantine.jsonl", quarantine)
    if (folder / DROPPED_FILE).is_file():
        shutil.copyfile(folder / DROPPED_FILE, quarantine.with_name(DROPPED_FILE))
    return train, eval_examples, meta


def train_tokenizer_on(
    records: Sequence[Mapping[str, Any]],
    vocab_size: int,
    cache: Path,
    *,
    what: str = "the training data",
    quarantine: Path | None = None,
) -> Any:
    """A tokenizer trained on the records' texts, cached at ``cache`` (atomic write).

    Raises:
        DataError: no text to train on, naming ``what`` (the files or sources) and the
            ``quarantine`` file where the rows that were read went.
    """
    from tscale.data.tokenize import load_tokenizer

    if cache.is_file():
        return load_tokenizer(cache)
    texts = [t for t in tokenizer_texts(records) if t]
    if not texts:
        seen = (
            f"; the rows read and why they were left out are in {quarantine}"
            if (quarantine is not None and quarantine.exists())
            else ""
        )
        raise DataError(
            f"{len(records)} usable training records in {what}, with no text to train a "
            f"tokenizer on{seen}. Fix the data, or set data.tokenizer.path"
        )
    tok = train_tokenizer(texts, vocab_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, cache)
    return tok
