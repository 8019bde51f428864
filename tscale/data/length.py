"""Length manager: per-column character limits and a token budget over a record's text columns.

Pure functions over records. :func:`truncate_text` cuts one string to a character limit with a
strategy; :func:`fit_record` applies per-column character limits, then fits the record into
``max_total_length`` tokens by giving each column a share of the budget; :func:`fit_chat` fits a
chat record (oldest exchanges out first, then the last user message and assistant turn shared
like a prompt and a completion). :class:`LengthBudget` picks between them per record.

**Truncated, dropped or malformed.** A record over a limit is cut (``excess="truncate"``), or
returned as :class:`Dropped` (``excess="drop"``, or when nothing of its answer would be left): a
decision of the length policy, which callers count apart from the plain ``Err`` of a malformed
record (quarantined).

**What ``max_total_length`` counts.** With ``count_total`` (a function of the whole record, e.g.
:func:`tscale.data.prompt.make_sample_counter`) it counts exactly what that function returns — in
tscale's pipeline, the ``input_ids`` of the tokenized sample: template text, special tokens (BOS
and EOS included) and the columns; after fitting, ``count_total(record) <= max_total_length``.
Without it, it counts ``sum(count_tokens(record[c]) for c in columns) + overhead_tokens``: the
columns' tokens, each column counted on its own, plus a fixed allowance the caller states for
everything else. Packing adds nothing to a document, so the same number is a document's length
in a pack.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from tscale.core.result import Err, Ok
from tscale.errors import DataError

Strategy = Literal["smart", "sentence_boundary", "word_boundary", "hard"]
Side = Literal["left", "right"]
Distribution = Literal["balanced", "proportional", "priority", "ratio"]
Excess = Literal["truncate", "drop", "raise"]

STRATEGIES: tuple[str, ...] = ("smart", "sentence_boundary", "word_boundary", "hard")
SIDES: tuple[str, ...] = ("left", "right")
DISTRIBUTIONS: tuple[str, ...] = ("balanced", "proportional", "priority", "ratio")
EXCESS_POLICIES: tuple[str, ...] = ("truncate", "drop", "raise")

# A sentence ends after . ! ? or … (and closing quotes/brackets) followed by whitespace, or at a
# line break. The match is the whitespace after the sentence; its start is where the sentence ends.
_SENTENCE_GAP = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n\s*")
_WORD_GAP = re.compile(r"\s+")

# Passes of the count_total loop before giving up (each pass shrinks the budget by the excess).
_MAX_FIT_PASSES = 8


def _boundaries(text: str, gap: re.Pattern[str]) -> list[tuple[int, int]]:
    """``(end of a unit, start of the next)`` for every gap between units of ``text``."""
    out = []
    for m in gap.finditer(text):
        # For sentences, closing quotes/brackets belong to the sentence before the whitespace.
        stripped = m.group().lstrip("\"'”’)]")
        end = m.start() + (len(m.group()) - len(stripped))
        if end > 0 and m.end() < len(text):
            out.append((end, m.end()))
    return out


def _cut_at_units(text: str, max_chars: int, side: str, gap: re.Pattern[str]) -> str:
    """The longest run of whole units (sentences or words) within ``max_chars``, or ``""``."""
    if side == "right":  # keep the beginning
        best = 0
        for end, _ in _boundaries(text, gap):
            if end > max_chars:
                break
            best = end
        return text[:best]
    first = len(text) - max_chars  # keep the end: the kept part must start at or after `first`
    for _, start in _boundaries(text, gap):
        if start >= first:
            return text[start:]
    return ""


def truncate_text(
    text: str, max_chars: int, *, strategy: str = "smart", side: str = "right"
) -> str:
    """``text`` cut to at most ``max_chars`` characters.

    Strategies: ``hard`` cuts at the character; ``word_boundary`` keeps whole words only (``""``
    if the first word does not fit); ``sentence_boundary`` keeps whole sentences only (``""`` if
    the first does not fit); ``smart`` tries sentences, then words, then characters. A sentence
    ends at ``. ! ? …`` (with closing quotes or brackets) before whitespace, or at a line break.
    ``side`` is the end that is cut away: ``right`` keeps the beginning, ``left`` keeps the end.
    Boundary cuts drop the whitespace at the cut. Text within the limit is returned unchanged.

    Raises:
        DataError: a negative limit, or an unknown strategy or side.
    """
    if max_chars < 0:
        raise DataError(f"max_chars must be >= 0, got {max_chars}")
    if strategy not in STRATEGIES:
        raise DataError(f"unknown truncation strategy {strategy!r}; use one of {list(STRATEGIES)}")
    if side not in SIDES:
        raise DataError(f"unknown truncation side {side!r}; use one of {list(SIDES)}")
    if len(text) <= max_chars:
        return text
    if max_chars == 0:
        return ""
    order = {
        "hard": (),
        "word_boundary": (_WORD_GAP,),
        "sentence_boundary": (_SENTENCE_GAP,),
        "smart": (_SENTENCE_GAP, _WORD_GAP),
    }[strategy]
    for gap in order:
        cut = _cut_at_units(text, max_chars, side, gap)
        if cut or strategy != "smart":
            return cut
    return text[:max_chars] if side == "right" else text[len(text) - max_chars :]


def truncate_to_tokens(
    text: str,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    *,
    strategy: str = "smart",
    side: str = "right",
) -> str:
    """The longest :func:`truncate_text` cut of ``text`` with at most ``max_tokens`` tokens.

    Binary search over the character limit: O(log len(text)) calls of ``count_tokens``. The
    result always satisfies the limit (``""`` counts as 0 tokens).
    """
    if count_tokens(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)  # invariant: cut(lo) fits, cut(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(truncate_text(text, mid, strategy=strategy, side=side)) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return truncate_text(text, lo, strategy=strategy, side=side)


@attrs.frozen
class Dropped(Err):
    """A record left out by the length policy, not for being malformed: over a limit with
    ``excess: drop``, or nothing of its answer fits. Counted as *dropped* (written to the
    dropped-rows file), never as *quarantined*; it does not count against ``max_error_rate``.

    ``reason`` starts with its kind: ``too long: …``, ``nothing trainable fits: …`` or
    ``over character limit: …``.
    """


@attrs.frozen
class LengthReport:
    """Counts of what :func:`fit_record` did; add reports (``a + b``) to aggregate them.

    ``truncated[column][reason]`` counts truncated columns, ``dropped[reason]`` dropped records;
    reasons are ``char_limit`` and ``token_budget`` (dropped reasons also name the column for
    ``char_limit``: ``"char_limit:prompt"``).
    """

    records: int = 0
    kept: int = 0
    truncated: Mapping[str, Mapping[str, int]] = attrs.field(factory=dict)
    dropped: Mapping[str, int] = attrs.field(factory=dict)
    truncated_records: int = 0
    """Records with at least one truncated column."""
    truncated_examples: int = 0
    """Truncated records that became examples (set by :func:`~tscale.data.prepare.prepare_examples`;
    a truncated record can still fail later, e.g. when its template does not render)."""

    def __add__(self, other: LengthReport) -> LengthReport:
        truncated: dict[str, dict[str, int]] = {c: dict(r) for c, r in self.truncated.items()}
        for column, reasons in other.truncated.items():
            mine = truncated.setdefault(column, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n
        dropped = dict(self.dropped)
        for reason, n in other.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        return LengthReport(
            self.records + other.records,
            self.kept + other.kept,
            truncated,
            dropped,
            self.truncated_records + other.truncated_records,
            self.truncated_examples + other.truncated_examples,
        )

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"kept {self.kept}/{self.records} records"]
        cut = [f"{c} {r}: {n}" for c, rs in sorted(self.truncated.items()) for r, n in rs.items()]
        if cut:
            records = f" in {self.truncated_records} records" if self.truncated_records else ""
            parts.append("truncated " + ", ".join(cut) + records)
        if self.dropped:
            parts.append(
                "dropped " + ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items()))
            )
        return "; ".join(parts)


def _per_column(
    value: str | Mapping[str, str], columns: Sequence[str], name: str, choices: Sequence[str]
) -> dict[str, str]:
    """One value per column from a value for all or a mapping (missing columns: the first
    choice's default, ``smart`` / ``right``)."""
    if isinstance(value, str):
        out = dict.fromkeys(columns, value)
    else:
        unknown = set(value) - set(columns)
        if unknown:
            raise DataError(
                f"{name} names columns {sorted(unknown)} not in columns {list(columns)}"
            )
        default = "right" if name == "sides" else "smart"
        out = {c: value.get(c, default) for c in columns}
    bad = {c: v for c, v in out.items() if v not in choices}
    if bad:
        raise DataError(f"{name}: {bad} not among {list(choices)}")
    return out


def _largest_remainder(shares: Mapping[str, float], total: int, caps: Mapping[str, int]) -> dict:
    """Integer allocations from real shares: floors, then +1 by largest fraction (column order on
    ties), never above ``caps`` and summing to at most ``total``."""
    out = {c: min(caps[c], int(s)) for c, s in shares.items()}
    left = total - sum(out.values())
    order = sorted(shares, key=lambda c: -(shares[c] - int(shares[c])))
    for c in order:
        if left <= 0:
            break
        if out[c] < caps[c]:
            out[c] += 1
            left -= 1
    return out


ANSWER_COLUMNS: tuple[str, ...] = ("completion", "output")
"""The text columns that hold the trained answer of a record."""


def balanced_ratios(columns: Sequence[str]) -> dict[str, float]:
    """The shares of ``balanced``: the answer column weighs as much as all the others together
    (each prompt-side column 1); without an answer column, or with only one, equal shares."""
    prompt_side = [c for c in columns if c not in ANSWER_COLUMNS]
    answer_weight = float(max(len(prompt_side), 1))
    return {c: answer_weight if c in ANSWER_COLUMNS else 1.0 for c in columns}


def _check_distribution(
    columns: Sequence[str],
    distribution: str,
    priority: Sequence[str] | None,
    ratios: Mapping[str, float] | None,
) -> None:
    if distribution not in DISTRIBUTIONS:
        raise DataError(f"unknown content_distribution {distribution!r}; use {list(DISTRIBUTIONS)}")
    bad_priority = priority is None or sorted(priority) != sorted(columns)
    if distribution == "priority" and bad_priority:
        raise DataError(
            f"content_distribution 'priority' needs priority listing every column once "
            f"(most important first); columns {columns}, priority {priority}"
        )
    bad_ratios = (
        ratios is None or set(ratios) != set(columns) or any(r <= 0 for r in ratios.values())
    )
    if distribution == "ratio" and bad_ratios:
        raise DataError(
            f"content_distribution 'ratio' needs a positive ratio for every column; "
            f"columns {columns}, ratios {ratios}"
        )


def allocate_budget(
    counts: Mapping[str, int],
    budget: int,
    *,
    distribution: str = "proportional",
    priority: Sequence[str] | None = None,
    ratios: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Per-column token caps that sum to at most ``budget`` (columns under budget keep all).

    - ``balanced``: the answer column (``completion``/``output``) may keep up to half of the
      budget, the other (prompt-side) columns share the other half; a side needing less gives the
      rest to the other (``ratio`` with :func:`balanced_ratios`).
    - ``proportional``: every column keeps the same fraction ``budget / total``.
    - ``priority``: ``priority`` lists columns most important first; the excess is taken from the
      least important column first (emptying it if needed), then the next.
    - ``ratio``: fixed shares ``ratios[c] / sum(ratios)`` of the budget; a column needing less
      than its share keeps all of it and the rest is shared by the others in the same ratios
      (weighted max-min fairness).

    Raises:
        DataError: an unknown distribution, or ``priority``/``ratios`` not covering the columns.
    """
    columns = list(counts)
    _check_distribution(columns, distribution, priority, ratios)
    budget = max(budget, 0)
    total = sum(counts.values())
    if total <= budget:
        return dict(counts)
    if distribution == "balanced":
        distribution, ratios = "ratio", balanced_ratios(columns)
    if distribution == "proportional":
        shares = {c: counts[c] * budget / total for c in columns}
        return _largest_remainder(shares, budget, counts)
    if distribution == "priority":
        assert priority is not None
        caps = dict(counts)
        excess = total - budget
        for c in reversed(priority):
            cut = min(excess, caps[c])
            caps[c] -= cut
            excess -= cut
        return caps
    assert ratios is not None
    caps = {}
    active = list(columns)
    left = budget
    while active:
        weight = sum(ratios[c] for c in active)
        shares = {c: left * ratios[c] / weight for c in active}
        satisfied = [c for c in active if counts[c] <= shares[c]]
        if not satisfied:
            caps.update(_largest_remainder(shares, left, counts))
            break
        for c in satisfied:
            caps[c] = counts[c]
            left -= counts[c]
            active.remove(c)
    return {c: caps[c] for c in columns}


def fit_record(
    record: Mapping[str, Any],
    *,
    columns: Sequence[str],
    count_tokens: Callable[[str], int],
    max_total_length: int | None = None,
    per_column_limits: Mapping[str, int] | None = None,
    strategy: str | Mapping[str, str] = "smart",
    sides: str | Mapping[str, str] = "right",
    content_distribution: str = "proportional",
    priority: Sequence[str] | None = None,
    ratios: Mapping[str, float] | None = None,
    excess: str = "truncate",
    overhead_tokens: int = 0,
    count_total: Callable[[Mapping[str, Any]], int] | None = None,
    where: str | None = None,
    limit_name: str = "max_total_length",
) -> tuple[Ok[dict] | Err, LengthReport]:
    """Fit one record's text ``columns`` into the limits; a new record, the input is not changed.

    First each column over its ``per_column_limits`` character limit is handled, then the token
    budget (see the module doc for what ``max_total_length`` counts): the budget left for the
    columns is shared by ``content_distribution`` (:func:`allocate_budget`) and each column is cut
    to its share with its strategy and side (:func:`truncate_to_tokens`). With ``count_total``
    the fit is checked on the whole record and the budget shrunk by any remaining excess (token
    merges across template text make column counts inexact), up to 8 passes.

    ``excess`` decides what happens to a record over a limit: ``truncate`` cuts as above,
    ``drop`` returns :class:`Dropped`, ``raise`` raises ``DataError``. A record whose answer
    column (``completion``/``output``) would be cut to nothing is :class:`Dropped` too (nothing
    trainable fits). A missing or non-string column is a plain ``Err`` (malformed).

    Args:
        limit_name: how messages name ``max_total_length`` (e.g. ``data.max_length``).

    Returns:
        ``(Ok(record) | Err, report)``: the report counts this record (add reports to aggregate).

    Raises:
        DataError: bad arguments, or a record over a limit with ``excess="raise"``.
    """
    if excess not in EXCESS_POLICIES:
        raise DataError(f"unknown excess policy {excess!r}; use one of {list(EXCESS_POLICIES)}")
    if max_total_length is not None and max_total_length < 1:
        raise DataError(f"max_total_length must be >= 1, got {max_total_length}")
    limits = dict(per_column_limits or {})
    unknown = set(limits) - set(columns)
    if unknown:
        raise DataError(
            f"per_column_limits names {sorted(unknown)}, not in columns {list(columns)}"
        )
    if max_total_length is not None:
        _check_distribution(columns, content_distribution, priority, ratios)
    strategies = _per_column(strategy, columns, "strategy", STRATEGIES)
    side_of = _per_column(sides, columns, "sides", SIDES)
    fail = _failer(record, excess, where)

    for c in columns:
        if not isinstance(record.get(c), str):
            what = "missing" if record.get(c) is None else "not a string"
            return Err(f"column {c!r} {what}", record, where), LengthReport(
                1, 0, {}, {"invalid": 1}
            )
    out = dict(record)
    truncated: dict[str, dict[str, int]] = {}

    def mark(column: str, reason: str) -> None:
        truncated.setdefault(column, {})[reason] = 1

    for c, limit in limits.items():
        if len(out[c]) > limit:
            if excess != "truncate":
                return fail(
                    f"char_limit:{c}",
                    f"over character limit: column {c!r} has {len(out[c])} characters > limit "
                    f"{limit}",
                )
            out[c] = truncate_text(out[c], limit, strategy=strategies[c], side=side_of[c])
            mark(c, "char_limit")

    if max_total_length is not None:
        counter = None
        if count_total is not None:
            counter = _guarded(count_total)
        try:
            result = _fit_budget(
                out,
                columns,
                count_tokens,
                max_total_length,
                strategies,
                side_of,
                content_distribution,
                priority,
                ratios,
                excess,
                overhead_tokens,
                counter,
                limit_name,
            )
        except _CountError as e:  # the record cannot be rendered: its own fault, not a limit's
            reason = f"cannot count tokens: {e}"
            return Err(reason, record, where), LengthReport(1, 0, {}, {"uncountable": 1})
        if isinstance(result, str):
            return fail("token_budget", result)
        for c in result:
            mark(c, "token_budget")
    for c in ANSWER_COLUMNS:
        if c in truncated and c in columns and not out[c].strip() and record[c].strip():
            return fail(
                "nothing_trainable",
                f"nothing trainable fits: column {c!r} (the answer) was cut to nothing to fit "
                f"{limit_name} {max_total_length}",
            )
    return Ok(out), LengthReport(1, 1, truncated, {}, int(bool(truncated)))


def _failer(
    record: Mapping[str, Any], excess: str, where: str | None
) -> Callable[[str, str], tuple[Err, LengthReport]]:
    """``fail(reason key, detail)``: the :class:`Dropped` result of a record the policy leaves
    out, or the ``DataError`` of ``excess="raise"``."""

    def fail(reason: str, detail: str) -> tuple[Err, LengthReport]:
        if excess == "raise":
            raise DataError(
                f"{detail}{f' at {where}' if where else ''} (data.length.excess: raise; use "
                "truncate or drop to go on)"
            )
        return Dropped(detail, record, where), LengthReport(1, 0, {}, {reason: 1})

    return fail


def fit_chat(
    record: Mapping[str, Any],
    *,
    max_total_length: int,
    count_total: Callable[[Mapping[str, Any]], int],
    count_tokens: Callable[[str], int],
    strategy: str | Mapping[str, str] = "smart",
    sides: str | Mapping[str, str] = "right",
    content_distribution: str = "balanced",
    priority: Sequence[str] | None = None,
    ratios: Mapping[str, float] | None = None,
    excess: str = "truncate",
    where: str | None = None,
    limit_name: str = "max_total_length",
) -> tuple[Ok[dict] | Err, LengthReport]:
    """Fit a chat record (``messages``/``conversations``) into ``max_total_length`` tokens as
    ``count_total`` counts them (the finished sample); a new record, the input is not changed.

    With ``excess="truncate"``, in this order, each step only while the sample is still too long:

    1. messages after the last assistant turn (they train nothing) are left out;
    2. the oldest exchanges (a user message and the turns up to the next one) are left out, as
       few as needed (binary search); system messages and the final exchange always stay;
    3. the final exchange's user message (cut from the side of ``sides["prompt"]``) and the last
       assistant turn (``sides["completion"]``) share what is left, as the ``prompt`` and
       ``completion`` columns of :func:`fit_record` would (``content_distribution``).

    The result holds ``messages`` (``role``/``content``; ShareGPT turns normalised). A record
    whose system messages and template alone exceed the limit, or whose last assistant turn would
    be cut to nothing, is :class:`Dropped`; ``excess="drop"`` drops every record over the limit.
    The report marks ``turns: oldest_dropped`` and ``prompt``/``completion: token_budget``.

    Raises:
        DataError: bad arguments, or a record over the limit with ``excess="raise"``.
    """
    from tscale.data.prompt import to_messages  # prompt does not import length: no cycle

    if excess not in EXCESS_POLICIES:
        raise DataError(f"unknown excess policy {excess!r}; use one of {list(EXCESS_POLICIES)}")
    if max_total_length < 1:
        raise DataError(f"max_total_length must be >= 1, got {max_total_length}")
    count = _guarded(count_total)
    fail = _failer(record, excess, where)
    try:
        total = count(record)
    except _CountError as e:
        return Err(f"cannot count tokens: {e}", record, where), LengthReport(
            1, 0, {}, {"uncountable": 1}
        )
    if total <= max_total_length:
        return Ok(dict(record)), LengthReport(1, 1)
    if excess != "truncate":
        return fail("token_budget", f"too long: {total} tokens > {limit_name} {max_total_length}")
    got = to_messages(record)
    assistants = (
        []
        if isinstance(got, Err)
        else [i for i, m in enumerate(got.value) if m["role"] == "assistant"]
    )
    if not assistants:  # nothing to keep training on: rendering reports the record as it is
        return Ok(dict(record)), LengthReport(1, 1)
    messages = [dict(m) for m in got.value[: assistants[-1] + 1]]
    last = len(messages) - 1
    users = [i for i in range(last) if messages[i]["role"] == "user"]
    final = users[-1] if users else last  # where the final exchange starts
    groups: list[list[int]] = []  # the earlier exchanges, oldest first
    for i in range(final):
        if messages[i]["role"] == "system":
            continue
        if not groups or messages[i]["role"] == "user":
            groups.append([])
        groups[-1].append(i)
    base = {k: v for k, v in record.items() if k not in ("messages", "conversations")}

    def build(dropped: int, contents: Mapping[int, str] | None = None) -> dict:
        gone = {i for g in groups[:dropped] for i in g}
        kept = [
            {**m, "content": (contents or {}).get(i, m["content"])}
            for i, m in enumerate(messages)
            if i not in gone
        ]
        return {**base, "messages": kept}

    truncated: dict[str, dict[str, int]] = {}
    try:
        # fewest exchanges to leave out: counts fall as exchanges go, so a binary search
        lo, hi = -1, len(groups)  # build(lo) is over the limit (or unknown), build(hi) unknown
        if count(build(hi)) <= max_total_length:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if count(build(max(mid, 0))) <= max_total_length:
                    hi = mid
                else:
                    lo = mid
            hi = max(hi, 0)
            if hi or last + 1 < len(got.value):
                truncated["turns"] = {"oldest_dropped": 1}
            return Ok(build(hi)), LengthReport(1, 1, truncated, {}, int(bool(truncated)))
        if groups or last + 1 < len(got.value):
            truncated["turns"] = {"oldest_dropped": 1}
        # the final exchange: its user message and the last assistant turn share what is left
        slots = {"completion": last} if final == last else {"prompt": final, "completion": last}
        proxy = {c: messages[i]["content"] for c, i in slots.items()}
        columns = list(slots)

        def count_proxy(p: Mapping[str, Any]) -> int:
            return count(build(len(groups), {i: p[c] for c, i in slots.items()}))

        distribution, prio, rat = content_distribution, priority, ratios
        prio = [c for c in prio if c in slots] if prio is not None else None
        rat = {c: r for c, r in rat.items() if c in slots} if rat is not None else None
        if (distribution == "priority" and sorted(prio or []) != sorted(columns)) or (
            distribution == "ratio" and set(rat or {}) != set(columns)
        ):
            distribution = "balanced"  # the settings name alpaca columns only
        result = _fit_budget(
            proxy,
            columns,
            count_tokens,
            max_total_length,
            _per_column(_only(strategy, columns), columns, "strategy", STRATEGIES),
            _per_column(_only(sides, columns), columns, "sides", SIDES),
            distribution,
            prio,
            rat,
            "truncate",
            0,
            count_proxy,
            limit_name,
        )
    except _CountError as e:
        return Err(f"cannot count tokens: {e}", record, where), LengthReport(
            1, 0, {}, {"uncountable": 1}
        )
    if isinstance(result, str):
        return fail("token_budget", result)
    if not proxy["completion"].strip():
        return fail(
            "nothing_trainable",
            f"nothing trainable fits: the last assistant turn was cut to nothing to fit "
            f"{limit_name} {max_total_length}",
        )
    for c in result:
        truncated[c] = {"token_budget": 1}
    out = build(len(groups), {i: proxy[c] for c, i in slots.items()})
    return Ok(out), LengthReport(1, 1, truncated, {}, int(bool(truncated)))


def _only(value: Any, columns: Sequence[str]) -> Any:
    """A per-column setting restricted to ``columns`` (a plain value is kept as it is)."""
    if isinstance(value, Mapping):
        return {c: v for c, v in value.items() if c in columns}
    return value


class _CountError(Exception):
    """``count_total`` failed on a record (it raised DataError)."""


def _guarded(count_total: Callable[[Mapping[str, Any]], int]) -> Callable[[Mapping[str, Any]], int]:
    def count(record: Mapping[str, Any]) -> int:
        try:
            return count_total(record)
        except DataError as e:
            raise _CountError(str(e)) from e

    return count


def _fit_budget(
    out: dict,
    columns: Sequence[str],
    count_tokens: Callable[[str], int],
    max_total_length: int,
    strategies: Mapping[str, str],
    sides: Mapping[str, str],
    distribution: str,
    priority: Sequence[str] | None,
    ratios: Mapping[str, float] | None,
    excess: str,
    overhead_tokens: int,
    count_total: Callable[[Mapping[str, Any]], int] | None,
    limit_name: str = "max_total_length",
) -> list[str] | str:
    """Cut ``out``'s columns in place to fit; the truncated columns, or a reason it cannot fit."""
    # With count_total, most records fit: check that first and count columns only when cutting.
    if count_total is not None:
        total = count_total(out)
        if total <= max_total_length:
            return []
    counts = {c: count_tokens(out[c]) for c in columns}
    if count_total is None:
        total = sum(counts.values()) + overhead_tokens
        if total <= max_total_length:
            return []
    overhead = total - sum(counts.values())
    if excess != "truncate":
        return f"too long: {total} tokens > {limit_name} {max_total_length}"
    budget = max_total_length - overhead
    cut: list[str] = []
    for _ in range(_MAX_FIT_PASSES):
        if budget < 0 or not columns:
            return (
                f"nothing trainable fits: {total} tokens > {limit_name} {max_total_length} and the "
                f"text outside the columns {list(columns)} alone takes {overhead}"
            )
        caps = allocate_budget(
            counts, budget, distribution=distribution, priority=priority, ratios=ratios
        )
        for c in columns:
            if caps[c] < counts[c]:
                out[c] = truncate_to_tokens(
                    out[c], caps[c], count_tokens, strategy=strategies[c], side=sides[c]
                )
                counts[c] = count_tokens(out[c])
                if c not in cut:
                    cut.append(c)
        if count_total is None:
            return cut
        total = count_total(out)
        if total <= max_total_length:
            return cut
        budget = min(budget, sum(counts.values())) - (total - max_total_length)
    return (
        f"nothing trainable fits: could not fit {limit_name} {max_total_length} tokens in "
        f"{_MAX_FIT_PASSES} passes (last: {total})"
    )


def fit_records(
    records: Iterable[Mapping[str, Any]],
    where: Sequence[str | None] | None = None,
    **kwargs: Any,
) -> tuple[list[Ok[dict] | Err], LengthReport]:
    """:func:`fit_record` over many records, with the aggregated report."""
    results: list[Ok[dict] | Err] = []
    report = LengthReport()
    records = list(records)
    places = list(where) if where is not None else [None] * len(records)
    for rec, place in zip(records, places, strict=True):
        result, rep = fit_record(rec, where=place, **kwargs)
        results.append(result)
        report = report + rep
    return results, report


_RECORD_TEXT_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("instruction", ("instruction", "input", "output")),
    ("output", ("instruction", "input", "output")),
    ("prompt", ("prompt", "completion")),
    ("completion", ("prompt", "completion")),
)
TEXT_COLUMNS: tuple[str, ...] = ("prompt", "completion", "instruction", "input", "output")
"""The text columns a length budget can cut: prompt/completion and alpaca records."""


def text_columns(record: Mapping[str, Any]) -> list[str]:
    """The text columns of a record, as :func:`tscale.data.prompt.to_messages` reads its shape.

    Chat records (``messages``/``conversations``) have none; alpaca records have ``instruction``,
    ``input`` (only when it is a string: it is optional) and ``output``; prompt/completion records
    have ``prompt`` and ``completion``.
    """
    if "messages" in record or "conversations" in record:
        return []
    for key, columns in _RECORD_TEXT_COLUMNS:
        if key in record:
            return [c for c in columns if c != "input" or isinstance(record.get(c), str)]
    return []


def answer_text(record: Mapping[str, Any]) -> str | None:
    """The trained answer of a record: the content of its last assistant message as
    :func:`tscale.data.prompt.to_messages` reads it (``completion``, ``output``, the last
    assistant or ShareGPT ``gpt`` turn); None when there is none or the record is malformed."""
    from tscale.data.prompt import to_messages

    got = to_messages(record)
    if isinstance(got, Err):
        return None
    return next((m["content"] for m in reversed(got.value) if m["role"] == "assistant"), None)


@attrs.frozen(kw_only=True)
class LengthBudget:
    """The limits of :func:`fit_record` as one record, applied to each record's own columns.

    ``columns`` None means :func:`text_columns` of each record; the per-column settings
    (``per_column_limits``, a mapping ``strategy``/``sides``, ``priority``, ``ratios``) may name
    any of :data:`TEXT_COLUMNS` and are restricted to the columns a record has.
    """

    max_total_length: int | None = None
    per_column_limits: Mapping[str, int] = attrs.field(factory=dict)
    strategy: str | Mapping[str, str] = "smart"
    sides: str | Mapping[str, str] = "right"
    content_distribution: str = "proportional"
    priority: Sequence[str] | None = None
    ratios: Mapping[str, float] | None = None
    excess: str = "truncate"
    columns: Sequence[str] | None = None
    limit_name: str = "max_total_length"
    """How messages name the token limit (``data.max_length``, ``data.length.max_total_length``)."""

    def columns_of(self, record: Mapping[str, Any]) -> list[str]:
        """The columns this budget fits in ``record``."""
        return list(self.columns) if self.columns is not None else text_columns(record)

    def needs_fit(self, record: Mapping[str, Any], n_tokens: int) -> bool:
        """Whether :meth:`fit` could change or reject ``record``, whose finished sample has
        ``n_tokens`` tokens (False: ``fit`` would return it unchanged, so it can be skipped)."""
        for c in self.columns_of(record):
            value = record.get(c)
            if not isinstance(value, str):
                return True
            limit = self.per_column_limits.get(c)
            if limit is not None and len(value) > limit:
                return True
        return self.max_total_length is not None and n_tokens > self.max_total_length

    def fit(
        self,
        record: Mapping[str, Any],
        *,
        count_tokens: Callable[[str], int],
        count_total: Callable[[Mapping[str, Any]], int] | None = None,
        where: str | None = None,
    ) -> tuple[Ok[dict] | Err, LengthReport]:
        """:func:`fit_record` of ``record`` with this budget over its columns; a chat record
        (``messages``/``conversations``) goes through :func:`fit_chat` (with ``count_total``)."""
        chat = "messages" in record or "conversations" in record
        if chat and self.columns is None and self.max_total_length is not None:
            if count_total is None:
                raise DataError("fitting a chat record needs count_total (the sample's tokens)")
            return fit_chat(
                record,
                max_total_length=self.max_total_length,
                count_total=count_total,
                count_tokens=count_tokens,
                strategy=self.strategy,
                sides=self.sides,
                content_distribution=self.content_distribution,
                priority=self.priority,
                ratios=self.ratios,
                excess=self.excess,
                where=where,
                limit_name=self.limit_name,
            )
        columns = self.columns_of(record)
        present = set(columns)

        def only(value: Any) -> Any:
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, Mapping):
                return {c: v for c, v in value.items() if c in present}
            return [c for c in value if c in present]

        return fit_record(
            record,
            columns=columns,
            count_tokens=count_tokens,
            max_total_length=self.max_total_length,
            per_column_limits=only(self.per_column_limits),
            strategy=only(self.strategy),
            sides=only(self.sides),
            content_distribution=self.content_distribution,
            priority=only(self.priority),
            ratios=only(self.ratios),
            excess=self.excess,
            count_total=count_total,
            where=where,
            limit_name=self.limit_name,
        )
