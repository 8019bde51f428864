"""The data report: every row read accounted for once, printed before training.

:func:`tscale.train.data_build.build_data` fills ``bundle.report["train"]`` and
``bundle.report["eval"]`` with :func:`split_counts`; the trainer prints :func:`report_lines` on
rank 0 before the first step and writes the whole ``bundle.report`` to
``<run>/data_report.json`` (:func:`write_report`); the run summary holds the same dict under
``data``. A row is exactly one of

- **trained** (eval: **kept**): it became an example, perhaps truncated to fit
  (``truncated``) or, with ``data.packing.split_overflow``, split over several packed rows
  (``split``);
- **dropped**: the length policy left it out (``data.length.excess: drop``, or nothing of its
  answer fits the limit), written to ``<run>/data/dropped.jsonl``;
- **quarantined**: it is malformed (bad JSON, missing fields, a template error, nothing to
  train on), written to ``<run>/data/quarantine.jsonl`` and counted against
  ``data.max_error_rate``.

So ``trained + dropped + quarantined == rows_read`` (:func:`accounted`). With
``data.streaming`` the counts are those of the rows read so far (``complete`` is False).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

TOP_REASONS = 3
"""Reasons shown per kind in the printed report (the JSON keeps all of them)."""

REPORT_FILE = "data_report.json"


def reason_key(reason: str) -> str:
    """The kind of an ``Err``/``Dropped`` reason, for counting: the text before its first
    colon and before a ``(column …)`` note, with numbers as ``N`` (``"too long: 80 tokens > …"``
    → ``"too long"``)."""
    head = reason.split(":", 1)[0].split(" (column ")[0].strip()
    return re.sub(r"\d+", "N", head) or "unknown"


def split_counts(
    *,
    rows_read: int,
    kept: int,
    dropped: Mapping[str, int],
    quarantined: Mapping[str, int],
    truncated: int,
    kept_name: str = "trained",
    split: int | None = 0,
    **extra: Any,
) -> dict[str, Any]:
    """The accounting of one split (train or eval) as a JSON-able dict.

    Args:
        rows_read: rows read from the files (bad lines included).
        kept: rows that became examples (``trained`` for train, ``kept`` for eval).
        dropped, quarantined: counts by reason (:func:`reason_key`).
        truncated: kept rows that were cut to fit.
        kept_name: the key of ``kept`` in the record.
        split: kept rows split over several packed rows (None: not tracked).
        extra: more fields (``examples``, ``input_tokens``, ``trained_tokens``, ``fill_rate`` …).

    Returns:
        ``{"rows_read", kept_name, "dropped", "quarantined", "dropped_reasons",
        "quarantined_reasons", "truncated", "split", **extra}``; reasons most frequent first.
    """

    def ordered(counts: Mapping[str, int]) -> dict[str, int]:
        return dict(sorted(((r, n) for r, n in counts.items() if n), key=lambda x: (-x[1], x[0])))

    return {
        "rows_read": rows_read,
        kept_name: kept,
        "dropped": sum(dropped.values()),
        "quarantined": sum(quarantined.values()),
        "dropped_reasons": ordered(dropped),
        "quarantined_reasons": ordered(quarantined),
        "truncated": truncated,
        "split": split,
        **extra,
    }


def accounted(counts: Mapping[str, Any]) -> bool:
    """Whether trained (kept) + dropped + quarantined == rows read in a :func:`split_counts`."""
    kept = counts.get("trained", counts.get("kept", 0))
    return kept + counts["dropped"] + counts["quarantined"] == counts["rows_read"]


def token_counts(examples: list[dict], pack_report: Any | None) -> dict[str, Any]:
    """Input tokens, trained tokens (labels that carry loss) and, packed, the row count and fill
    rate of one epoch of training examples."""
    if pack_report is not None:
        return {
            "input_tokens": pack_report.tokens,
            "trained_tokens": pack_report.trained_tokens,
            "packed_rows": pack_report.sequences,
            "fill_rate": pack_report.fill_rate,
        }
    return {
        "input_tokens": sum(len(e["input_ids"]) for e in examples),
        "trained_tokens": sum(len(e["labels"]) - list(e["labels"]).count(-100) for e in examples),
        "packed_rows": None,
        "fill_rate": None,
    }


def _reasons(counts: Mapping[str, int]) -> str:
    shown = list(counts.items())[:TOP_REASONS]
    text = ", ".join(f"{r} ({n})" for r, n in shown)
    more = len(counts) - len(shown)
    return text + (f", {more} more reason{'s' if more > 1 else ''}" if more > 0 else "")


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The data report as a few plain lines (what ``tscale train`` prints before training)."""
    train = report.get("train")
    if not train:
        return []
    so_far = "" if report.get("complete", True) else " so far (streaming)"
    rows = train["rows_read"]
    lines = [
        f"data: {rows} training rows read{so_far}: {train['trained']} trained, "
        f"{train['dropped']} dropped, {train['quarantined']} quarantined"
    ]
    shapes = report.get("shapes")
    if shapes and len(shapes) > 1:
        mix = ", ".join(f"{k} {n}" for k, n in shapes.items())
        lines.append(
            f"  mixed shapes, each row read in its own: {mix} (data.format forces one shape; "
            "data.column_map names other columns)"
        )
    cut = []
    if train["truncated"]:
        limit = report.get("limit") or "the length limit"
        cut.append(f"{train['truncated']} truncated to fit {limit}")
    if train.get("split"):
        cut.append(f"{train['split']} split over several packed rows")
    if cut:
        lines.append(f"  of the trained rows: {', '.join(cut)}")
    if train["dropped"]:
        where = f" -> {report['dropped_file']}" if report.get("dropped_file") else ""
        lines.append(f"  dropped: {_reasons(train['dropped_reasons'])}{where}")
    if train["quarantined"]:
        rate = train["quarantined"] / rows if rows else 0.0
        cap = report.get("max_error_rate")
        limit = f", data.max_error_rate {cap:.1%}" if cap is not None else ""
        where = f" -> {report['quarantine']}" if report.get("quarantine") else ""
        lines.append(
            f"  quarantined ({rate:.1%}{limit}): {_reasons(train['quarantined_reasons'])}{where}"
        )
    if train.get("input_tokens") is not None:
        tokens = (
            f"  tokens per epoch: {train['input_tokens']:,} input, "
            f"{train['trained_tokens']:,} trained"
        )
        if train.get("fill_rate") is not None:
            tokens += f"; {train['packed_rows']:,} packed rows, fill {train['fill_rate']:.1%}"
        lines.append(tokens)
    tok = report.get("tokenizer")
    if tok:
        line = f"  tokenizer: {tok['source']}, template {tok['template']}"
        if tok.get("pad_is_eos"):
            line += f"; it has no pad token: padding with its eos {tok['eos_token']!r} (no loss)"
        lines.append(line)
    ev = report.get("eval")
    if ev and ev["rows_read"]:
        line = (
            f"  eval: {ev['rows_read']} rows read: {ev['kept']} kept, {ev['dropped']} dropped, "
            f"{ev['quarantined']} quarantined"
        )
        if ev["truncated"]:
            line += f" ({ev['truncated']} truncated)"
        lines.append(line)
    if report.get("cache") == "hit":
        lines.append(f"  (processed data read from the cache {report.get('cache_path')})")
    return lines


def print_report(console: Console, report: Mapping[str, Any]) -> None:
    """Print :func:`report_lines` (no markup, long lines kept whole)."""
    for line in report_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def write_report(run_dir: Path, report: Mapping[str, Any]) -> Path:
    """Write ``report`` to ``<run_dir>/data_report.json``; returns the path."""
    path = Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    return path
