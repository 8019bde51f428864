"""Look at a dataset before training on it: splits, columns, record format, column mapping.

:func:`inspect_source` reads a source (local files or a hub dataset) and detects its format from
its column names (:data:`SYNONYMS`, overridden by a user ``column_map``) and, for conversations,
from its values (``role``/``content`` is chat, ``from``/``value`` is ShareGPT).
:func:`canonicalize` then renames each record's columns to the canonical schema of
:data:`FORMAT_FIELDS`, per record ``Ok``/``Err``, so every later step sees one shape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from tscale.core.result import Err, Ok
from tscale.data.prompt import normalize_sharegpt
from tscale.data.sources import (
    ResolvedSource,
    SpecLike,
    hub_error,
    load_source,
    quiet_datasets,
    resolve_source,
)
from tscale.errors import DataError

FORMATS: tuple[str, ...] = (
    "text",
    "prompt_completion",
    "alpaca",
    "chat",
    "sharegpt",
    "preference",
    "preference_chat",
    "unpaired_preference",
    "unpaired_preference_chat",
    "unknown",
)
"""The record formats :func:`detect_format` can report."""

FORMAT_FIELDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "chat": (("messages",), ()),
    "sharegpt": (("messages",), ()),
    "preference": (("chosen", "rejected"), ("prompt", "system", "margin")),
    "preference_chat": (("chosen", "rejected"), ("prompt", "margin")),
    "unpaired_preference": (("prompt", "completion", "label"), ("system",)),
    "unpaired_preference_chat": (("prompt", "completion", "label"), ()),
}
"""Format → (required, optional) canonical fields. ShareGPT canonicalizes to ``messages``.

Paired preference rows (``preference``: strings; ``preference_chat``: the prompt a conversation,
chosen/rejected lists of messages, or, without a prompt, whole conversations sharing a prefix)
train DPO and its kin; they may carry a numeric ``margin`` per pair (kept as it is here; the
reward task reads and checks it, :func:`tscale.data.preference.record_margin`). Unpaired rows
(``unpaired_preference``/``_chat``: prompt, completion and a boolean ``label``, desirable or
not) train KTO (see :mod:`tscale.data.preference`)."""

SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "prompt": (
        "prompt", "question", "instruction", "query", "input_text", "problem", "source", "input",
    ),
    "completion": (
        "completion", "answer", "response", "output", "target", "solution", "reply", "output_text",
    ),
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output",),
    "chosen": ("chosen", "preferred", "chosen_response", "accepted", "winner"),
    "rejected": ("rejected", "dispreferred", "rejected_response", "loser"),
    "messages": (
        "messages", "conversations", "conversation", "dialog", "dialogue", "turns", "chat",
    ),
    "text": ("text", "content", "document", "body", "raw_text"),
    "system": ("system", "system_prompt"),
    "label": ("label", "desirable", "is_desirable", "kto_label"),
    "margin": ("margin",),
}  # fmt: skip
"""Canonical field → column names that mean it (compared case-insensitively, first match wins).

A user ``column_map`` (``{canonical: column}``) takes precedence over this table.
"""

CANONICAL_FIELDS: tuple[str, ...] = tuple(SYNONYMS)
_NON_EMPTY = frozenset({"text", "completion", "instruction", "output", "chosen", "rejected"})
_PAIRED = ("preference", "preference_chat")
_UNPAIRED = ("unpaired_preference", "unpaired_preference_chat")
_CHAT_VALUED = ("preference_chat", "unpaired_preference_chat")  # their values may be messages


@attrs.frozen
class SourceInfo:
    """What :func:`inspect_source` found.

    Attributes:
        spec: the source as given (a path, a hub name …).
        kind: ``"files"``, ``"saved"`` (a ``save_to_disk`` directory) or ``"hub"``.
        builder: the ``datasets`` builder for local files (``json``, ``csv`` …), else None.
        configs: the hub dataset's configurations (subsets); ``()`` for local data.
        config: the configuration inspected, or None.
        splits: split → row count (None where the hub does not say).
        split: the split whose columns and sample were inspected.
        columns: its column names, in order.
        features: column → ``datasets`` feature type, as text.
        format: one of :data:`FORMATS`.
        column_map: canonical field → source column, for the format's fields.
        sample_size: the rows looked at to detect the format.
        bad_rows: rows of the split that do not parse (training quarantines them).
        first_bad: the first of them, ``"file:line N: reason"``.
    """

    spec: str
    kind: str
    builder: str | None
    configs: tuple[str, ...]
    config: str | None
    splits: Mapping[str, int | None]
    split: str
    columns: tuple[str, ...]
    features: Mapping[str, str]
    format: str
    column_map: Mapping[str, str]
    sample_size: int
    bad_rows: int = 0
    first_bad: str | None = None

    @property
    def has_eval_split(self) -> bool:
        """Whether the source has a split other than ``train`` to evaluate on."""
        return any(s != "train" for s in self.splits)

    def summary(self) -> str:
        """A few lines for ``tscale data inspect``."""
        splits = ", ".join(f"{k}: {'?' if v is None else v} rows" for k, v in self.splits.items())
        mapping = ", ".join(f"{k} ← {v}" for k, v in self.column_map.items()) or "none"
        lines = [
            f"source: {self.spec} ({self.kind}{f', {self.builder}' if self.builder else ''})",
            f"splits: {splits}",
            f"columns ({self.split}): "
            + ", ".join(f"{c}: {self.features.get(c, '?')}" for c in self.columns),
            f"format: {self.format}; columns: {mapping}",
        ]
        if self.bad_rows:
            lines.append(
                f"bad rows ({self.split}): {self.bad_rows}, first {self.first_bad} (training "
                "quarantines them and trains the rest, within data.max_error_rate)"
            )
        if self.configs:
            lines.insert(1, f"configs: {', '.join(self.configs)} (inspected: {self.config})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _message_style(values: Sequence[Any]) -> str | None:
    """``"chat"`` when the values are lists of ``{role, content}``, ``"sharegpt"`` for
    ``{from, value}``, else None (decided by majority over the non-empty lists)."""
    votes = {"chat": 0, "sharegpt": 0}
    for v in values:
        if isinstance(v, list) and v and isinstance(v[0], Mapping):
            keys = set(v[0])
            if {"role", "content"} <= keys:
                votes["chat"] += 1
            elif {"from", "value"} <= keys:
                votes["sharegpt"] += 1
    best = max(votes, key=lambda k: votes[k])
    return best if votes[best] else None


def _boolean_labels(values: Sequence[Any]) -> bool:
    """Whether the non-None values are booleans (an unpaired preference ``label``), by majority."""
    seen = [v for v in values if v is not None]
    return bool(seen) and 2 * sum(isinstance(v, bool) for v in seen) > len(seen)


def _check_column_map(column_map: Mapping[str, str], columns: Sequence[str]) -> dict[str, str]:
    out = {}
    for field, column in column_map.items():
        if field not in SYNONYMS:
            raise DataError(
                f"column_map key {field!r} is not a canonical field; use one of "
                f"{list(CANONICAL_FIELDS)} (mapping canonical field → your column)"
            )
        if column not in columns:
            raise DataError(
                f"column_map maps {field!r} to column {column!r}, which the data does not have; "
                f"its columns are {list(columns)}"
            )
        out[field] = column
    return out


def detect_format(
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    column_map: Mapping[str, str] | None = None,
    format: str = "auto",
) -> tuple[str, dict[str, str]]:
    """The record format and the canonical field → column mapping of a table.

    Paired preference (``chosen``/``rejected``) is tried first, then unpaired preference
    (``prompt``/``completion`` with a boolean ``label``), conversations, alpaca
    (``instruction`` + ``output``), prompt/completion, then ``text``. A preference format whose
    chosen (or completion) values are lists of messages is the ``_chat`` one, forced or not.
    Conversation columns are recognised by name or by value: any column whose values are lists
    of ``{role, content}`` (chat) or ``{from, value}`` (ShareGPT).

    Args:
        columns: the column names.
        rows: a sample of rows (dicts), for the value checks.
        column_map: ``{canonical field: column}`` from the user; it wins over the synonyms.
        format: ``"auto"`` or one of :data:`FORMATS` to insist on (then its required fields must
            be found).

    Raises:
        DataError: a ``column_map`` naming an unknown field or column, an unknown ``format``, or
            a forced format whose required fields are not found.
    """
    if format != "auto" and format not in FORMAT_FIELDS:
        raise DataError(f"unknown data format {format!r}; use auto or one of {list(FORMAT_FIELDS)}")
    user = _check_column_map(column_map or {}, columns)
    by_lower = {c.lower(): c for c in columns}

    def fields(fmt: str) -> dict[str, str] | None:
        """The format's fields → columns, or None when a required one is not found."""
        required, optional = FORMAT_FIELDS[fmt]
        found: dict[str, str] = {}
        for field in (*required, *optional):
            col = user.get(field)
            if col is None:
                taken = {*user.values(), *found.values()}  # a column serves one field
                names = (by_lower.get(n) for n in SYNONYMS[field])
                col = next((c for c in names if c is not None and c not in taken), None)
            if col is not None:
                found[field] = col
            elif field in required:
                return None
        return found

    def style(col: str) -> str | None:
        return _message_style([r.get(col) for r in rows if r.get(col) is not None])

    def chat_kind(fmt: str, found: dict[str, str]) -> tuple[str, dict[str, str]]:
        """A preference format and its fields, ``_chat`` when its values are messages."""
        answer = found["chosen" if fmt in _PAIRED else "completion"]
        if (
            style(answer) is None
            and (style(found["prompt"]) if "prompt" in found else None) is None
        ):
            return fmt.removesuffix("_chat"), found
        found.pop("system", None)
        return (fmt if fmt.endswith("_chat") else f"{fmt}_chat"), found

    if format != "auto":
        found = fields(format)
        if found is None:
            required = FORMAT_FIELDS[format][0]
            raise DataError(
                f"format {format!r} needs the field(s) {list(required)}, which the columns "
                f"{list(columns)} do not provide; map them with column_map "
                f"(e.g. {{{required[0]!r}: 'your_column'}})"
            )
        if format in ("chat", "sharegpt"):
            seen = style(found["messages"])
            if seen not in (None, format):
                raise DataError(
                    f"format {format!r}, but column {found['messages']!r} holds {seen} turns "
                    f"({'role/content' if seen == 'chat' else 'from/value'}); use format {seen}"
                )
        if format in (*_PAIRED, *_UNPAIRED):
            return chat_kind(format, found)
        return format, found

    found = fields("preference")
    if found is not None:
        return chat_kind("preference", found)
    found = fields("unpaired_preference")
    if found is not None and _boolean_labels([r.get(found["label"]) for r in rows]):
        return chat_kind("unpaired_preference", found)
    found = fields("chat")
    if found is not None and (seen := style(found["messages"])) is not None:
        return seen, found
    for fmt in ("alpaca", "prompt_completion", "text"):
        found = fields(fmt)
        if found is not None:
            return fmt, found
    # Conversations under a name the table does not know: look at the values.
    for col in columns:
        if col not in user.values() and (seen := style(col)) is not None:
            return seen, {"messages": col}
    return "unknown", {}


# --------------------------------------------------------------------------------------------
# Inspecting a source
# --------------------------------------------------------------------------------------------


def inspect_source(
    spec: SpecLike,
    *,
    split: str | None = None,
    sample_rows: int = 200,
    column_map: Mapping[str, str] | None = None,
    format: str = "auto",
    config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SourceInfo:
    """Configs, splits and row counts, columns and features, format and column mapping.

    Local files are read whole (that validates them: an unreadable file or line is a DataError
    naming it); a hub dataset is read through ``datasets.get_dataset_config_names``,
    ``load_dataset_builder`` and a streamed sample of ``sample_rows`` rows.

    Args:
        spec: see :mod:`tscale.data.sources`.
        split: the split to look at (default: ``train``, else the first).
        sample_rows: rows used for format detection.
        column_map: ``{canonical field: column}`` overrides (the user's YAML).
        format: ``"auto"`` or a format to insist on.
        config: the hub configuration (default: the first).
        cache_dir: the ``datasets`` cache.

    Raises:
        DataError: unreadable data, an unknown split, a bad ``column_map``, or an unreachable hub
            (the message says to pass local files).
    """
    if sample_rows < 1:
        raise DataError(f"sample_rows must be at least 1, got {sample_rows}")
    source = resolve_source(spec)
    if source.kind == "hub":
        return _inspect_hub(source.name, split, sample_rows, column_map, format, config, cache_dir)
    if source.kind == "saved":
        import datasets

        assert source.path is not None
        with quiet_datasets():
            loaded = datasets.load_from_disk(os.fspath(source.path))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    else:
        try:
            parts = {s: load_source(spec, split=s, cache_dir=cache_dir) for s in source.data_files}
        except DataError:
            # a bad row (or files of several formats): the one reader reads what is readable
            return _inspect_rows(source, split, sample_rows, column_map, format)
    chosen = _choose_split(split, list(parts), source.name)
    ds = parts[chosen]
    rows = ds.select(range(min(sample_rows, len(ds)))).to_list()
    fmt, mapping = detect_format(ds.column_names, rows, column_map=column_map, format=format)
    return SourceInfo(
        spec=source.name,
        kind=source.kind,
        builder=source.builder,
        configs=(),
        config=None,
        splits={k: len(v) for k, v in parts.items()},
        split=chosen,
        columns=tuple(ds.column_names),
        features={k: str(v) for k, v in ds.features.items()},
        format=fmt,
        column_map=mapping,
        sample_size=len(rows),
    )


def _inspect_rows(
    source: ResolvedSource,
    split: str | None,
    sample_rows: int,
    column_map: Mapping[str, str] | None,
    format: str,
) -> SourceInfo:
    """:func:`inspect_source` of local files that ``datasets`` cannot read whole: each file
    through :func:`tscale.data.load.read_file`, bad rows counted (training quarantines them)."""
    from tscale.data.load import read_file

    counts: dict[str, int] = {}
    bad: dict[str, list[Err]] = {}
    good: dict[str, list[dict]] = {}
    for name, files in source.data_files.items():
        rows = [row for f in files for row, _ in read_file(f)]
        good[name] = [r.value for r in rows if isinstance(r, Ok)]
        bad[name] = [r for r in rows if isinstance(r, Err)]
        counts[name] = len(good[name])
    chosen = _choose_split(split, list(counts), source.name)
    if not good[chosen]:
        errors = bad[chosen]
        raise DataError(
            f"{source.name}: none of its {len(errors)} rows ({chosen}) can be read; the first "
            f"is {errors[0].where}: {errors[0].reason}"
            if errors
            else f"{source.name} has no rows"
        )
    sample = good[chosen][:sample_rows]
    columns = list(dict.fromkeys(k for row in good[chosen] for k in row))
    fmt, mapping = detect_format(columns, sample, column_map=column_map, format=format)
    types: dict[str, set[str]] = {}
    for row in good[chosen]:
        for k, v in row.items():
            if v is not None:
                types.setdefault(k, set()).add(type(v).__name__)
    errors = bad[chosen]
    return SourceInfo(
        spec=source.name,
        kind=source.kind,
        builder=source.builder,
        configs=(),
        config=None,
        splits=counts,
        split=chosen,
        columns=tuple(columns),
        features={k: " | ".join(sorted(t)) for k, t in types.items()},
        format=fmt,
        column_map=mapping,
        sample_size=len(sample),
        bad_rows=len(errors),
        first_bad=f"{errors[0].where}: {errors[0].reason}" if errors else None,
    )


def _choose_split(split: str | None, splits: Sequence[str], name: str) -> str:
    if split is None:
        return "train" if "train" in splits else splits[0]
    if split not in splits:
        raise DataError(f"{name} has no split {split!r}; its splits are {list(splits)}")
    return split


def _inspect_hub(
    name: str,
    split: str | None,
    sample_rows: int,
    column_map: Mapping[str, str] | None,
    format: str,
    config: str | None,
    cache_dir: str | os.PathLike | None,
) -> SourceInfo:
    import datasets

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    try:
        with quiet_datasets():
            configs = tuple(datasets.get_dataset_config_names(name))
            if config is None and configs:
                config = configs[0]
            builder = datasets.load_dataset_builder(name, config, cache_dir=cache)
            info_splits = builder.info.splits or {}
            splits = {str(k): v.num_examples or None for k, v in info_splits.items()}
            chosen = _choose_split(split, list(splits) or ["train"], name)
            stream = datasets.load_dataset(name, config, split=chosen, streaming=True)
            rows = list(stream.take(sample_rows))
    except DataError:
        raise
    except Exception as e:  # hub errors come in many types; each becomes one clear message
        raise hub_error(name, e) from e
    features = builder.info.features or stream.features or {}
    columns = tuple(features) if features else tuple(rows[0]) if rows else ()
    fmt, mapping = detect_format(columns, rows, column_map=column_map, format=format)
    return SourceInfo(
        spec=name,
        kind="hub",
        builder=None,
        configs=configs,
        config=config,
        splits=splits or {chosen: None},
        split=chosen,
        columns=columns,
        features={k: str(v) for k, v in features.items()},
        format=fmt,
        column_map=mapping,
        sample_size=len(rows),
    )


# --------------------------------------------------------------------------------------------
# Canonical records
# --------------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return type(v).__name__


def _check_messages(value: Any, field: str) -> str | None:
    """Why ``value`` is not a non-empty list of ``{role: str, content: str}``, or None."""
    if not isinstance(value, list) or not value:
        return f"{field} empty or not a list"
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            return f"{field}: message {i} is not an object"
        if not isinstance(m.get("role"), str):
            return f"{field}: message {i} has no string 'role'"
        if not isinstance(m.get("content"), str):
            return f"{field}: message {i} content is not a string"
    return None


def _messages(value: Any) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


def canonicalize(
    record: Mapping[str, Any], info: SourceInfo, *, where: str | None = None
) -> Ok[dict] | Err:
    """The record in the canonical schema of ``info.format`` (see :data:`FORMAT_FIELDS`).

    Columns are renamed per ``info.column_map``; other columns are dropped. Every optional field
    the source has is always present (None when a row lacks it; alpaca's ``input`` is ``""``), so
    canonical rows share one schema. ShareGPT turns become ``messages`` via
    :func:`tscale.data.prompt.normalize_sharegpt`.

    Returns:
        ``Err`` naming the field and its column for a missing value, a value of the wrong type,
        or an empty string where text is needed (``completion``, ``output``, ``text`` …).

    Raises:
        DataError: ``info.format`` is ``"unknown"`` (map the columns with ``column_map``).
    """
    fmt = info.format
    if fmt not in FORMAT_FIELDS:
        raise DataError(
            f"the format of {info.spec} is {fmt!r}: none of its columns {list(info.columns)} "
            "are known; set data.column_map (e.g. {prompt: question, completion: answer})"
        )
    required, optional = FORMAT_FIELDS[fmt]
    out: dict[str, Any] = {}
    for field in (*required, *optional):
        col = info.column_map.get(field)
        if col is None:
            continue
        value = record.get(col)
        if value is None:
            if field in required:
                return Err(f"{field} missing (column {col!r})", dict(record), where)
            out[field] = "" if field == "input" else None
            continue
        if fmt == "sharegpt" and field == "messages":
            got = normalize_sharegpt({"conversations": value}, where=where)
            if isinstance(got, Err):
                return Err(got.reason, dict(record), where)
            value = got.value["messages"]
            if not value:
                return Err(f"messages empty (column {col!r})", dict(record), where)
        elif field == "label":  # unpaired preference: desirable (true) or not (false)
            if not isinstance(value, bool):
                return Err(
                    f"label not a boolean (column {col!r} holds {_type_name(value)})",
                    dict(record),
                    where,
                )
        elif field == "margin":
            pass  # a number, checked by the task that reads it (tscale.data.preference)
        elif field == "messages" or (fmt in _CHAT_VALUED and isinstance(value, list)):
            # chat turns; preference_chat's chosen/rejected (and a prompt given as turns)
            why = _check_messages(value, field)
            if why is not None:
                return Err(f"{why} (column {col!r})", dict(record), where)
            value = _messages(value)
        elif fmt in _CHAT_VALUED and field != "prompt":
            return Err(
                f"{field} not a list of messages (column {col!r} holds {_type_name(value)})",
                dict(record),
                where,
            )
        else:
            if not isinstance(value, str):
                return Err(
                    f"{field} not a string (column {col!r} holds {_type_name(value)})",
                    dict(record),
                    where,
                )
            if field in _NON_EMPTY and not value.strip():
                return Err(f"{field} empty (column {col!r})", dict(record), where)
        out["messages" if fmt == "sharegpt" else field] = value
    return Ok(out)


def iter_canonical(
    rows: Iterable[Mapping[str, Any]], info: SourceInfo, *, source: str | None = None
) -> Iterator[Ok[dict] | Err]:
    """:func:`canonicalize` each row, with ``where`` = ``"<source>:row N"`` (N from 1).

    ``source`` defaults to ``info.spec``; for a single-file split the row number is the file's.
    """
    name = info.spec if source is None else source
    for i, row in enumerate(rows):
        yield canonicalize(row, info, where=f"{name}:row {i + 1}")


SFT_SHAPES: tuple[str, ...] = ("prompt_completion", "alpaca", "chat", "sharegpt")
"""The formats supervised fine-tuning reads."""

PREFERENCE_SHAPES: tuple[str, ...] = (*_PAIRED, *_UNPAIRED)
"""The formats the preference tasks read (paired: DPO and kin; unpaired: KTO)."""

RECORD_SHAPES: tuple[str, ...] = (*SFT_SHAPES, *PREFERENCE_SHAPES)
"""The formats the reader canonicalizes; the task's example stage refuses the ones it cannot
train (one line naming the ``task.type`` to set)."""


def without_empty_system(record: dict) -> dict:
    """A canonical record without its ``system`` field when that is empty (None)."""
    if "system" in record and not isinstance(record["system"], str):
        record = {k: v for k, v in record.items() if k != "system"}
    return record


def row_info(
    row: Mapping[str, Any], *, column_map: Mapping[str, str] | None = None, spec: str = "row"
) -> SourceInfo:
    """The format of one row on its own (its keys and values), as a :class:`SourceInfo`; the
    ``column_map`` entries whose column the row has apply."""
    columns = list(row)
    user = {f: c for f, c in (column_map or {}).items() if c in row}
    fmt, mapping = detect_format(columns, [row], column_map=user)
    return SourceInfo(
        spec=spec,
        kind="row",
        builder=None,
        configs=(),
        config=None,
        splits={},
        split="train",
        columns=tuple(columns),
        features={},
        format=fmt,
        column_map=mapping,
        sample_size=1,
    )


def canonical_row(
    row: Mapping[str, Any],
    info: SourceInfo | None,
    *,
    where: str,
    per_row: bool = True,
    shapes: Sequence[str] = RECORD_SHAPES,
) -> tuple[Ok[dict] | Err, str]:
    """One row canonicalized: ``(Ok(record) | Err, format)``.

    With the source's ``info`` the row is read in the source's format; when that fails and
    ``per_row`` (``format: auto``), the row's own format is detected (:func:`row_info`) and, when
    it is another one of ``shapes``, the row is read in it: a file that mixes prompt/completion,
    alpaca and chat rows trains every row (preference rows are read too; the task's example
    stage says when they are not its own). Without ``info`` only the row's own format is used.
    """
    first: Ok[dict] | Err | None = None
    fmt = "unknown"
    if info is not None:
        fmt = info.format
        first = canonicalize(row, info, where=where)
        if isinstance(first, Ok) or not per_row:
            return _clean(first), canonical_format(fmt)
    own = row_info(row, column_map=info.column_map if info is not None else None)
    if own.format not in shapes or (info is not None and own.format == info.format):
        if first is not None:
            return first, canonical_format(fmt)
        keys = ", ".join(map(str, list(row)[:8])) or "none"
        return (
            Err(
                f"no known columns: {keys} (rows need prompt/completion, instruction/output or "
                "messages; map other names with data.column_map)",
                dict(row),
                where,
            ),
            "unknown",
        )
    return _clean(canonicalize(row, own, where=where)), canonical_format(own.format)


def _clean(res: Ok[dict] | Err) -> Ok[dict] | Err:
    return Ok(without_empty_system(res.value)) if isinstance(res, Ok) else res


def canonical_format(fmt: str) -> str:
    """The format of canonicalized records: ShareGPT becomes ``chat``, others stay."""
    return "chat" if fmt == "sharegpt" else fmt


# --------------------------------------------------------------------------------------------
# Eval split and length statistics
# --------------------------------------------------------------------------------------------


def make_eval_split(n_rows: int, *, size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, disjoint ``(train_indices, eval_indices)``, both sorted, for a source without one.

    Args:
        n_rows: rows in the source.
        size: eval rows (an int ≥ 1) or their fraction (a float in (0, 1); rounded, and
                kept between 1 and ``n_rows - 1``).
        seed: the permutation's seed; the same seed always gives the same split.

    Raises:
        DataError: a size that leaves no train or no eval row.
    """
    import numpy as np

    if isinstance(size, bool) or not isinstance(size, int | float):
        raise DataError(f"eval size must be an int or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise DataError(f"eval size {size} as a fraction must be in (0, 1)")
        k = min(max(1, round(n_rows * size)), n_rows - 1)  # at least one row each side
    else:
        k = size
    if k < 1 or k >= n_rows:
        raise DataError(
            f"eval size {size!r} gives {k} eval row(s) of {n_rows}; both train and eval need at "
            "least one row (lower eval size, or provide an eval split)"
        )
    perm = np.random.default_rng(seed).permutation(n_rows)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])


def _percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of sorted values: the smallest value with ≥ q% at or below it."""
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return int(ordered[rank - 1])


def length_histogram(lengths: Sequence[int], *, max_length: int, bins: int = 10) -> dict[str, Any]:
    """Length statistics for ``tscale data inspect``.

    Returns:
        ``count``, ``mean``, ``min``, ``p50``, ``p90``, ``p99``, ``max`` (nearest-rank
        percentiles; None when empty), ``over_budget`` (lengths > ``max_length``),
        ``over_budget_fraction``, ``max_length``, and ``bins``: ``[lo, hi, count]`` rows of equal
        width covering ``0 .. max(max, max_length)`` (``hi`` inclusive).
    """
    if max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}")
    if bins < 1:
        raise DataError(f"bins must be at least 1, got {bins}")
    ordered = sorted(int(x) for x in lengths)
    if any(x < 0 for x in ordered[:1]):
        raise DataError(f"lengths must be non-negative, got {ordered[0]}")
    n = len(ordered)
    over = sum(1 for x in ordered if x > max_length)
    top = max(ordered[-1] if ordered else 0, max_length)
    width = max(1, math.ceil((top + 1) / bins))
    bins = min(bins, math.ceil((top + 1) / width))  # no bucket starts past the top
    counts = [0] * bins
    for x in ordered:
        counts[min(x // width, bins - 1)] += 1
    table = [[i * width, min((i + 1) * width - 1, top) if i < bins - 1 else top, c]
             for i, c in enumerate(counts)]  # fmt: skip
    stats: dict[str, Any] = {"count": n, "max_length": max_length, "over_budget": over}
    stats["over_budget_fraction"] = over / n if n else 0.0
    if n:
        stats.update(
            mean=sum(ordered) / n,
            min=ordered[0],
            p50=_percentile(ordered, 50),
            p90=_percentile(ordered, 90),
            p99=_percentile(ordered, 99),
            max=ordered[-1],
        )
    else:
        stats.update(mean=None, min=None, p50=None, p90=None, p99=None, max=None)
    stats["bins"] = table
    return stats
