"""Load prompt/completion records from JSON-lines files; bad rows are quarantined, never dropped."""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from tscale.core.result import Err, Ok
from tscale.errors import DataError

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "completion")
CHAT_COLUMNS = ("messages", "conversations")


@attrs.frozen
class LoadReport:
    """What :func:`load_records` read: rows seen, rows kept, and rejected rows counted by reason."""

    files: tuple[str, ...]
    total: int
    kept: int
    errors: dict[str, int]
    quarantine: Path | None = None

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


def write_quarantine(errors: Sequence[Err], path: Path) -> None:
    """Append rejected records to a JSON-lines file, a ``{"where", "reason", "record"}`` a line."""
    if not errors:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for e in errors:
            line = {"where": e.where, "reason": e.reason, "record": e.record}
            f.write(json.dumps(line, ensure_ascii=False, default=repr) + "\n")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the progress bars of ``datasets`` for a small local load; restore them after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> str:
    """The innermost explicit cause of an exception (``datasets`` wraps the parser's error).

    Only ``__cause__`` links are followed: the implicit ``__context__`` of the parser's error is
    a fallback attempt of ``datasets`` whose message ("Trailing data") would mislead.
    """
    cur = exc
    while cur.__cause__ is not None and cur.__cause__ is not cur:
        cur = cur.__cause__
    return f"{type(cur).__name__}: {cur}" if str(cur) else type(cur).__name__


def _read_rows(path: Path, cache_dir: Path | None) -> list[dict[str, Any] | Err]:
    """All rows of one JSON-lines file through ``datasets`` (line by line when ``datasets``
    cannot parse it: a bad line is an ``Err``), or a DataError saying what to fix."""
    import datasets

    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (check the path; relative paths start "
            f"from the current directory {Path.cwd()})"
        )
    if path.stat().st_size == 0:
        raise DataError(
            f"data file {path} is empty; it needs one JSON object a line with "
            "'prompt' and 'completion'"
        )
    parser_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = parser_log.level
    parser_log.setLevel(logging.CRITICAL)  # a bad line is handled below, not logged as an error
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(
                "json",
                data_files=[str(path)],
                split="train",
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
    except Exception as e:  # datasets wraps parser errors in several types; StopIteration too
        # A bad line (or columns whose types differ between rows) fails the whole file in
        # datasets: read it line by line instead, so that only the bad lines are quarantined.
        rows = _read_lines(path)
        if rows is None:
            raise DataError(
                f"cannot read {path} as JSON lines ({_root_cause(e)}); each line must be one JSON "
                'object such as {"prompt": "...", "completion": "..."}'
            ) from e
        return rows
    finally:
        parser_log.setLevel(level)
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing and not any(c in ds.column_names for c in CHAT_COLUMNS):
        raise DataError(
            f"{path} has no column(s) {missing}; columns found: {ds.column_names}. Each row needs "
            "'prompt' (a string) and 'completion' (a non-empty string), or 'messages' (chat "
            "turns); rename the columns"
        )
    return ds.to_list()


def _read_lines(path: Path) -> list[dict[str, Any] | Err] | None:
    """The rows of a JSON-lines file read one line at a time (blank lines skipped): a dict per
    good line, ``Err("invalid JSON line")`` per bad one; None if the file is not UTF-8 text
    or has no good line at all (not JSON lines: the caller reports the file)."""
    rows: list[dict[str, Any] | Err] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            rows.append(Err("invalid JSON line", line, where))  # the line itself is kept
            continue
        if not isinstance(row, dict):
            rows.append(Err("invalid JSON line", line, where))  # a list, a number …
            continue
        rows.append(row)
    return rows if any(isinstance(r, dict) for r in rows) else None


def load_records(
    files: Sequence[str | Path],
    *,
    quarantine: Path | None = None,
    cache_dir: Path | None = None,
) -> tuple[list[dict], LoadReport]:
    """Read and validate prompt/completion records from JSON-lines files, in file order.

    Each row goes through :func:`validate_record`; a failing row is appended to ``quarantine`` (a
    JSON-lines file) with its place (``"data.jsonl:row 17"``, rows counted from 1 in file order)
    and counted by reason in the report. Extra columns are kept in the records.

    Args:
        files: JSON-lines files, read through ``datasets.load_dataset("json", ...)``.
        quarantine: where rejected rows are appended; None keeps only the counts.
        cache_dir: the ``datasets`` cache (default: its usual ``~/.cache/huggingface/datasets``).

    Raises:
        DataError: no files; a file missing, empty or unreadable; a required column missing; or
            every row of a file rejected (almost always a format mistake, not bad luck).
    """
    if not files:
        raise DataError("no data files given; pass at least one JSON-lines file")
    records: list[dict] = []
    reasons: Counter[str] = Counter()
    total = 0
    for file in files:
        path = Path(file)
        rows = _read_rows(path, cache_dir)
        errors: list[Err] = []
        for i, row in enumerate(rows):
            result = row if isinstance(row, Err) else validate_record(row, f"{path}:row {i + 1}")
            if isinstance(result, Ok):
                records.append(result.value)
            else:
                errors.append(result)
        total += len(rows)
        reasons.update(e.reason for e in errors)
        if quarantine is not None:
            write_quarantine(errors, quarantine)
        if errors and len(errors) == len(rows):
            common, count = Counter(e.reason for e in errors).most_common(1)[0]
            where = f"they are in {quarantine}" if quarantine else "pass quarantine= to see them"
            raise DataError(
                f"all {len(rows)} rows of {path} are invalid (most often {common!r}, {count} rows; "
                f"first at {errors[0].where}); {where}. Each row needs 'prompt' (a string) and "
                "'completion' (a non-empty string)"
            )
    report = LoadReport(
        files=tuple(str(f) for f in files),
        total=total,
        kept=len(records),
        errors=dict(reasons),
        quarantine=quarantine,
    )
    return records, report
