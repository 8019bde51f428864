"""The one reader of local data files: rows one at a time, ``Ok(row)`` or ``Err`` with its place.

Every local file the training data comes from (``data.train_files``, ``data.eval_files``,
``data.sources[i].path``, streaming or not) is read here, so a bad row is the same bad row on
every path:

- JSON lines (``.jsonl``, and ``.json`` that does not start with ``[``) are read line by line: a
  line that is not valid UTF-8, not valid JSON or not a JSON object is an ``Err`` with its place
  (``file:line N``) and the line itself (invalid bytes shown as ``\\xNN``), and the rest is read on.
  A UTF-8 byte-order mark and CRLF line ends are accepted; blank lines are not rows.
- A ``.json`` file that starts with ``[`` (and is not JSON lines) is one JSON document: a list of
  objects (a non-object element is an ``Err`` at ``file:row N``).
- CSV (``.csv``) is read with :mod:`csv` (quoted fields may hold newlines); an empty cell is None,
  as ``datasets`` reads it; a record with invalid UTF-8 or the wrong number of fields is an
  ``Err`` at ``file:line N`` (the line it starts on).
- Text (``.txt``) is one ``{"text": line}`` row a line.
- Parquet and Arrow are read through ``datasets`` (binary formats: no line to quarantine).

:func:`record_of` makes a record of a row of ``data.train_files`` / ``data.eval_files`` (without
``data.format``/``column_map``; :func:`load_records` does it for a list of files): rows in
tscale's own shapes (``prompt``/``completion``, ``messages``, ``conversations``) are kept
as they are (:func:`validate_record`); any other row has its shape detected on its own
(:func:`tscale.data.introspect.detect_format`: alpaca, ``question``/``answer`` …) and is
canonicalized, so a file that mixes shapes trains every row.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tscale.core.result import Err, Ok
from tscale.errors import DataError

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "completion")
CHAT_COLUMNS = ("messages", "conversations")
READERS: Mapping[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
"""File extension → how :func:`read_file` reads it (the ``datasets`` builder of the same name)."""

Row = tuple[Ok[dict] | Err, str]
"""A row read: ``(Ok(row) | Err(reason, raw text, where), where)``."""

_BOM = codecs.BOM_UTF8
_SHOWN = 2000  # characters of a bad line kept in the quarantine file (a huge row is cut)


@attrs.frozen
class LoadReport:
    """What :func:`load_records` read: rows seen, rows kept, and rejected rows counted by reason."""

    files: tuple[str, ...]
    total: int
    kept: int
    errors: dict[str, int]
    quarantine: Path | None = None
    shapes: dict[str, int] = attrs.field(factory=dict)
    """Kept rows by shape (``prompt_completion``, ``chat``, ``alpaca`` …)."""

    @property
    def rejected(self) -> int:
        """Rows that failed validation (all of them are in the quarantine file, when one is set)."""
        return self.total - self.kept

    def summary(self) -> str:
        """One line for logs, e.g. ``"kept 998/1000 rows (2 rejected: completion missing: 2)"``."""
        line = f"kept {self.kept}/{self.total} rows from {len(self.files)} file(s)"
        if self.errors:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.errors.items()))
            line += f" ({self.rejected} rejected: {reasons}"
            line += f"; see {self.quarantine})" if self.quarantine else ")"
        return line


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def supported(path: Path) -> bool:
    """Whether :func:`read_file` reads ``path`` (by extension; hidden files are not data)."""
    return path.suffix.lower() in READERS and not path.name.startswith(".")


def dir_files(path: Path) -> list[Path]:
    """The supported files under a directory (recursively, hidden entries skipped), sorted."""
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and supported(p) and not any(s.startswith(".") for s in rel.parts):
            out.append(p)
    return out


def expand_files(files: Sequence[str | os.PathLike], *, key: str | None = None) -> list[Path]:
    """The data files a file list names: a directory stands for the supported files under it.

    Raises:
        DataError: a missing path, an unsupported extension or a directory without data files,
            naming ``key[i]`` when ``key`` (the YAML key of the list) is given.
    """
    out: list[Path] = []
    for i, item in enumerate(files):
        path = Path(item).expanduser()
        label = f"{key}[{i}]: " if key else ""
        if path.is_dir():
            found = dir_files(path)
            if not found:
                seen = sorted(p.name for p in path.iterdir())[:10]
                raise DataError(
                    f"{label}{path} is a directory without data files ({', '.join(READERS)}); "
                    f"it holds {seen}. Put the data files there or list the files themselves"
                )
            out += found
        elif not path.exists():
            raise DataError(
                f"{label}data file not found: {path} (check the path; relative paths start "
                f"from the current directory {Path.cwd()})"
            )
        elif not supported(path):
            raise DataError(
                f"{label}{path}: unsupported file type {path.suffix!r}; use one of "
                f"{sorted(READERS)} (convert it, or rename a JSON-lines file to .jsonl)"
            )
        else:
            out.append(path)
    for path in out:
        if _empty(path):
            where = f"{key}[{_index(files, path)}]: " if key else ""
            raise DataError(f"{where}{path} is empty; it needs at least one row")
    return out


def _index(files: Sequence[str | os.PathLike], path: Path) -> int:
    """The list item a file came from (itself, or the directory it is in)."""
    for i, item in enumerate(files):
        p = Path(item).expanduser()
        if p == path or p in path.parents:
            return i
    return 0


def _empty(path: Path) -> bool:
    """Whether a data file holds no row: no bytes, or (text formats) only whitespace."""
    if path.stat().st_size == 0:
        return True
    return READERS.get(path.suffix.lower()) not in ("parquet", "arrow") and _blank(path)


def _shown(raw: bytes) -> str:
    """A raw line as text for the quarantine: invalid UTF-8 bytes as ``\\xNN``, line end cut."""
    text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}… ({len(text)} characters)"


def _utf8(raw: bytes, path: Path, n: int) -> str | Err:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Err(
            f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}",
            _shown(raw),
            f"{path}:line {n}",
        )


def _json_lines(path: Path, lines: Iterable[bytes]) -> Iterator[Row]:
    for n, raw in enumerate(lines, start=1):
        where = f"{path}:line {n}"
        if n == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        text = _utf8(raw, path, n)
        if isinstance(text, Err):
            yield text, where
            continue
        if not text.strip():
            continue  # a blank line is not a row
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield Err(f"invalid JSON line: {e.msg} at column {e.colno}", _shown(raw), where), where
            continue
        if not isinstance(value, dict):
            what = type(value).__name__
            yield Err(f"not a JSON object: a {what}", _shown(raw), where), where
            continue
        yield Ok(value), where


def _json_document(path: Path) -> Iterator[Row]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 at byte {e.start} of a JSON document (a file starting with "
            "'['); re-encode it as UTF-8, or write it as JSON lines so a bad row is only that row"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a file "
            "starting with '[' is read as one JSON document: fix it, or write one object a line"
        ) from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a JSON document must be a list of objects (one per row)")
    for i, row in enumerate(value, start=1):
        where = f"{path}:row {i}"
        if isinstance(row, dict):
            yield Ok(row), where
        else:
            shown = json.dumps(row, ensure_ascii=False)[:_SHOWN]
            yield Err(f"not a JSON object: a {type(row).__name__}", shown, where), where


def _read_json(path: Path) -> Iterator[Row]:
    """``.jsonl`` is JSON lines; ``.json`` is a JSON document when it starts with ``[`` and is not
    JSON lines whose first line is a complete value (e.g. a bad row ``[1, 2]``)."""
    if path.suffix.lower() == ".json" and _is_document(path):
        yield from _json_document(path)
        return
    with path.open("rb") as f:
        yield from _json_lines(path, f)


def _is_document(path: Path) -> bool:
    with path.open("rb") as f:
        lines = (
            raw for n, raw in enumerate(f) if (raw.removeprefix(_BOM) if n == 0 else raw).strip()
        )
        first = next(lines, b"").removeprefix(_BOM)
        if not first.lstrip().startswith(b"["):
            return False
        try:
            json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return True  # the list goes on after its first line: a document
        return next(lines, None) is None  # a one-line list is a document if nothing follows


def _read_csv(path: Path) -> Iterator[Row]:
    """CSV records, decoded with surrogate escapes so a bad byte spoils only its record."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        if any(_has_surrogate(h) for h in header):
            raise DataError(f"{path}:line 1: invalid UTF-8 in the CSV header; re-encode the file")
        start = reader.line_num + 1
        for fields in reader:
            where = f"{path}:line {start}"
            start = reader.line_num + 1
            if not fields:
                continue  # a blank line
            raw = ",".join(fields)
            if any(_has_surrogate(v) for v in fields):
                shown = _shown(raw.encode("utf-8", "surrogateescape"))
                yield Err("invalid UTF-8", shown, where), where
            elif len(fields) != len(header):
                reason = f"CSV row has {len(fields)} fields, the header {len(header)}"
                yield Err(reason, raw[:_SHOWN], where), where
            else:
                row = {h: (v if v != "" else None) for h, v in zip(header, fields, strict=True)}
                yield Ok(row), where


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_text(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            text = _utf8(raw, path, n)
            where = f"{path}:line {n}"
            yield (
                (text, where)
                if isinstance(text, Err)
                else (Ok({"text": text.rstrip("\r\n")}), where)
            )


def _read_table(path: Path, builder: str, cache_dir: Path | None) -> Iterator[Row]:
    import datasets

    from tscale.data.sources import quiet_datasets, root_cause  # sources imports this module

    try:
        with quiet_datasets():
            ds = datasets.load_dataset(
                builder,
                data_files=[os.fspath(path)],
                split="train",
                cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            )
    except Exception as e:  # datasets and pyarrow raise many types for a bad file
        raise DataError(
            f"cannot read {path} as {builder} ({root_cause(e)}); check that it is a valid "
            f"{builder} file"
        ) from e
    for i, row in enumerate(ds, start=1):
        yield Ok(dict(row)), f"{path}:row {i}"


def read_file(path: str | os.PathLike, *, cache_dir: Path | None = None) -> Iterator[Row]:
    """The rows of one data file, lazily (see the module doc for each format).

    Raises:
        DataError: the file is missing, empty, of an unsupported type, or broken as a whole
            (a JSON document that does not parse, a Parquet file that does not open).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {list(READERS)}"
        )
    if _empty(path):
        raise DataError(f"{path} is empty; it needs at least one row")
    if reader == "json":
        return _read_json(path)
    if reader == "csv":
        return _read_csv(path)
    if reader == "text":
        return _read_text(path)
    return _read_table(path, reader, cache_dir)


def _blank(path: Path) -> bool:
    """Whether a text file holds only whitespace (and a BOM)."""
    with path.open("rb") as f:
        return not f.read(1 << 16).removeprefix(_BOM).strip() and path.stat().st_size <= 1 << 16


def read_files(
    files: Sequence[str | os.PathLike], *, cache_dir: Path | None = None
) -> Iterator[Row]:
    """The rows of several files, in order (directories expanded by :func:`expand_files`)."""
    for path in expand_files(files):
        yield from read_file(path, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def validate_record(record: dict[str, Any], where: str | None = None) -> Ok[dict] | Err:
    """``Ok(record)`` if it has a string ``prompt`` and a non-empty string ``completion``, or a
    non-empty list of chat turns under ``messages`` (or ShareGPT's ``conversations``); the turns
    themselves are checked when the template renders them.

    The ``Err`` reasons are a fixed set of short phrases, so they can be counted.
    """
    for key in CHAT_COLUMNS:
        if key in record and record[key] is not None:
            turns = record[key]
            if not isinstance(turns, list) or not turns:
                return Err(f"{key} not a non-empty list", record, where)
            return Ok(record)
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is None:
        return Err("prompt missing", record, where)
    if not isinstance(prompt, str):
        return Err("prompt not a string", record, where)
    if completion is None:
        return Err("completion missing", record, where)
    if not isinstance(completion, str):
        return Err("completion not a string", record, where)
    if not completion:
        return Err("completion empty", record, where)
    return Ok(record)


def own_shape(row: Mapping[str, Any]) -> bool:
    """Whether a row is in one of tscale's own shapes (kept as it is by :func:`validate_record`)."""
    return any(k in row for k in (*REQUIRED_COLUMNS, *CHAT_COLUMNS))


def row_shape(row: Mapping[str, Any]) -> str:
    """The shape of one raw row in tscale's own fields, for counting."""
    if any(row.get(k) is not None for k in CHAT_COLUMNS):
        return "chat"
    return "prompt_completion"


def preference_row(row: Mapping[str, Any]) -> bool:
    """Whether a row is preference data: ``chosen`` and ``rejected`` (paired), or a
    ``completion`` with a boolean ``label`` (unpaired, KTO's)."""
    paired = "chosen" in row and "rejected" in row
    return paired or ("completion" in row and isinstance(row.get("label"), bool))


def record_of(row: dict[str, Any], where: str) -> tuple[Ok[dict] | Err, str]:
    """One row of ``data.train_files`` as a record: ``(Ok(record) | Err, shape)``.

    A row in tscale's own SFT shape is validated and kept whole (extra columns too); any other
    row (preference rows included) has its own shape detected and is canonicalized (alpaca,
    ``question``/``answer``, prompt/chosen/rejected …).
    """
    if own_shape(row) and not preference_row(row):
        return validate_record(row, where), row_shape(row)
    from tscale.data.introspect import canonical_row  # introspect → sources → this module

    return canonical_row(row, None, where=where)


def write_quarantine(errors: Sequence[Err], path: Path) -> None:
    """Append rejected records to a JSON-lines file, a ``{"where", "reason", "record"}`` a line."""
    if not errors:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for e in errors:
            line = {"where": e.where, "reason": e.reason, "record": e.record}
            f.write(json.dumps(line, ensure_ascii=False, default=repr) + "\n")


def all_bad_error(
    path: str, errors: Sequence[Err], rows: int, quarantine: Path | None
) -> DataError:
    """The error for a file (or source) none of whose ``rows`` is usable: the file, the count,
    the most common reason, the first place and where the rows are."""
    common, count = Counter(reason_head(e.reason) for e in errors).most_common(1)[0]
    where = f"they are in {quarantine}" if quarantine else "no quarantine file was given"
    return DataError(
        f"all {rows} rows of {path} are invalid (most often {common!r}, {count} rows; first at "
        f"{errors[0].where}); {where}. Each row needs 'prompt' (a string) and 'completion' (a "
        "non-empty string), 'messages' (chat turns) or alpaca's 'instruction'/'output'"
    )


def reason_head(reason: str) -> str:
    """A reason without its detail (``"invalid JSON line: Expecting value …"`` → the head)."""
    return reason.split(":", 1)[0].split(" (column ")[0].strip()


def load_records(
    files: Sequence[str | Path],
    *,
    quarantine: Path | None = None,
    cache_dir: Path | None = None,
) -> tuple[list[dict], LoadReport]:
    """Read and validate records from data files, in file order (see :func:`record_of`).

    A failing row is appended to ``quarantine`` (a JSON-lines file) with its place
    (``"data.jsonl:line 17"``) and counted by reason in the report.

    Args:
        files: data files or directories (JSON lines, JSON, CSV, Parquet, Arrow).
        quarantine: where rejected rows are appended; None keeps only the counts.
        cache_dir: the ``datasets`` cache for Parquet and Arrow files.

    Raises:
        DataError: no files; a file missing or empty; or every row of a file rejected (almost
            always a format mistake, not bad luck; the rows are in the quarantine file first).
    """
    records, _, report = read_records(files, quarantine=quarantine, cache_dir=cache_dir)
    return records, report


def read_records(
    files: Sequence[str | Path],
    *,
    quarantine: Path | None = None,
    cache_dir: Path | None = None,
) -> tuple[list[dict], list[str], LoadReport]:
    """:func:`load_records` with the place (``file:line N``) of every record kept."""
    if not files:
        raise DataError("no data files given; pass at least one JSON-lines file")
    records: list[dict] = []
    places: list[str] = []
    reasons: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    total = 0
    for path in expand_files(files):
        errors: list[Err] = []
        rows = 0
        for row, where in read_file(path, cache_dir=cache_dir):
            rows += 1
            if isinstance(row, Err):
                errors.append(row)
                continue
            result, shape = record_of(row.value, where)
            if isinstance(result, Ok):
                records.append(result.value)
                places.append(where)
                shapes[shape] += 1
            else:
                errors.append(result)
        total += rows
        reasons.update(reason_head(e.reason) for e in errors)
        if quarantine is not None:
            write_quarantine(errors, quarantine)
        if errors and len(errors) == rows:
            raise all_bad_error(str(path), errors, rows, quarantine)
    report = LoadReport(
        files=tuple(str(f) for f in files),
        total=total,
        kept=len(records),
        errors=dict(reasons),
        quarantine=quarantine,
        shapes=dict(shapes),
    )
    return records, places, report
