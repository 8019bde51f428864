"""Preference records → token ids: one prompt and its completions, each tokenized on its own.

Stage 1 of the preference batches (issue 14; docs/data.md, "Preference data"). A canonical
record (:mod:`tscale.data.introspect`) becomes ``Ok({"prompt_ids", "completions", "branches"})``:

- paired (``preference``/``preference_chat``: DPO and its kin): completions ``[chosen_ids,
  rejected_ids]``, branches ``[1, 2]``;
- unpaired (``unpaired_preference``/``_chat``: KTO): completions ``[completion_ids]``, branches
  ``[1]`` (desirable, ``label: true``) or ``[2]`` (undesirable).

Rendering: the prompt (a conversation, or a string as one user message) is rendered with the
generation prompt; a completion's text is the rendered prompt + that reply minus the rendered
prompt, so a template that does not render the prompt as the start of the whole is an ``Err``.
With the ``plain`` template a string prompt is the string and a completion the string. A record
without a prompt holds whole conversations (or texts) that share a start: the shared leading
messages (or words) are the prompt (:func:`split_implicit_prompt`).

Tokenization follows the BOS/EOS rule of docs/data.md: every text is encoded without special
tokens and on its own (no BPE merge crosses the prompt/completion border); the prompt starts
with BOS when the tokenizer adds one (never twice); a completion ends with EOS, appended when
its text does not already hold it (ChatML's ``<|im_end|>`` …). Every completion token is trained,
its end tokens included.

Length budgets (:class:`PreferenceLimits`): the prompt is cut from the left first (a leading BOS
kept), to ``max_prompt_length`` and then until the prompt and the longest completion fit
``max_length``; then each completion from the right, to ``max_completion_length`` and to what
``max_length`` leaves. A completion that is, or would become, empty is an ``Err`` (never an
empty sequence: its mean log-prob would be 0/0).

Margins (the reward task's, ``margins=True``): a paired record may carry a ``margin`` column,
the amount its chosen reward must beat the rejected one by (Llama 2's rating-based margin;
TRL's ``RewardTrainer`` reads the same column). Its example then holds ``"margin": float``; a
margin that is not a finite number is an ``Err`` (:func:`record_margin`). Without
``margins`` the column is ignored, as TRL's ``DPOTrainer`` ignores it.

Pure: no I/O; the caller writes the ``Err`` results to its quarantine file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import attrs
import jinja2

from tscale.core.result import Err, Ok
from tscale.data.length import LengthBudget, LengthReport
from tscale.data.prompt import (
    BUILTIN_TEMPLATES,
    TEMPLATE_NAMES,
    ChatTemplate,
    get_template,
    render_messages,
)
from tscale.data.tokenize import Encoder
from tscale.errors import DataError

__all__ = [
    "DESIRABLE",
    "MARGIN",
    "PAIRED_BRANCHES",
    "UNDESIRABLE",
    "PreferenceLimits",
    "PreferenceTurns",
    "encode_preferences",
    "fit_preference",
    "preference_examples",
    "preference_kind",
    "preference_turns",
    "record_margin",
    "refuse_preference_records",
    "render_preference",
    "split_implicit_prompt",
]

PAIRED_BRANCHES: tuple[int, int] = (1, 2)
"""Branch ids of a pair: chosen, rejected."""
DESIRABLE, UNDESIRABLE = 1, 2
"""Branch id of an unpaired completion by its label."""

MARGIN = "margin"
"""The record column (and example key) of a pair's margin."""

CHUNK_ROWS = 2048
"""Records whose texts are encoded per ``encode_batch`` call."""

_Message = dict[str, str]
_PLAIN_SOURCE = BUILTIN_TEMPLATES["plain"].source


# --------------------------------------------------------------------------------------------
# What a record is
# --------------------------------------------------------------------------------------------


def preference_kind(record: Mapping[str, Any]) -> str | None:
    """``"paired"`` (chosen and rejected), ``"unpaired"`` (a completion with a boolean label)
    or None (not preference data)."""
    if "chosen" in record and "rejected" in record:
        return "paired"
    if "completion" in record and isinstance(record.get("label"), bool):
        return "unpaired"
    return None


def refuse_preference_records(records: Sequence[Mapping[str, Any]], places: Sequence[str]) -> None:
    """Raise when a record is preference data: supervised fine-tuning cannot train it.

    Raises:
        DataError: one line naming the first such record and the ``task.type`` to set.
    """
    for record, where in zip(records, places, strict=True):
        kind = preference_kind(record)
        if kind == "paired":
            raise DataError(
                f"{where}: preference data (prompt/chosen/rejected) cannot train supervised "
                "fine-tuning; set task.type: dpo (or another preference task)"
            )
        if kind == "unpaired":
            raise DataError(
                f"{where}: unpaired preference data (prompt/completion/label) cannot train "
                "supervised fine-tuning; set task.type: kto"
            )


def _refuse_other_records(
    records: Sequence[Mapping[str, Any]], places: Sequence[str], *, unpaired: bool
) -> None:
    """Raise at the first record the preference stage (paired or not) cannot train."""
    want = "unpaired" if unpaired else "paired"
    for record, where in zip(records, places, strict=True):
        kind = preference_kind(record)
        if kind == want:
            continue
        keys = ", ".join(map(str, list(record)[:6]))
        if kind is None:
            needs = (
                "prompt, completion and a boolean label"
                if unpaired
                else "prompt, chosen and rejected (strings or chat messages)"
            )
            raise DataError(
                f"{where}: a supervised fine-tuning record ({keys}), not preference data; this "
                f"task needs {needs}: set task.type: sft to fine-tune on it, or map your "
                "columns with data.column_map (e.g. {chosen: good, rejected: bad})"
            )
        if kind == "unpaired":
            raise DataError(
                f"{where}: unpaired preference data (prompt/completion/label) is KTO's; set "
                "task.type: kto (this task trains prompt/chosen/rejected pairs)"
            )
        raise DataError(
            f"{where}: paired preference data (prompt/chosen/rejected); KTO trains unpaired rows "
            "(prompt, completion, label: true/false): set task.type: dpo, or write each pair as "
            "two unpaired rows"
        )


def record_margin(record: Mapping[str, Any], *, where: str | None = None) -> Ok[float | None] | Err:
    """The record's ``margin`` as a float, None when the record has no margin column.

    Any finite real number is a margin (TRL does not restrict it either; a negative one lets
    the rejected reward exceed the chosen one by up to ``|m|`` at a low loss); a boolean is
    not one.

    Returns:
        ``Err`` when the column is there but the value is missing (None), not a number (a
        string, a boolean, a list …), NaN or infinite: such a margin would make the pair's loss
        NaN or infinite. Each reason starts with its kind (``margin missing``, ``margin not a
        number``, ``margin not finite``), as the data report counts them.
    """
    if MARGIN not in record:
        return Ok(None)
    value = record[MARGIN]
    if value is None:
        why = "margin missing: the data has a margin column, give every pair one"
        return Err(why, None, where)
    if isinstance(value, bool) or not isinstance(value, Real):
        kind = type(value).__name__
        return Err(f"margin not a number: holds {kind} {value!r:.40}", None, where)
    margin = float(value)
    if not math.isfinite(margin):
        return Err(f"margin not finite: {margin}", None, where)
    return Ok(margin)


# --------------------------------------------------------------------------------------------
# Records → conversations
# --------------------------------------------------------------------------------------------


@attrs.frozen
class PreferenceTurns:
    """A record as messages: the prompt conversation and each completion's messages (usually
    one assistant message), with their names (``chosen``, ``rejected``, ``completion``) and
    branch ids."""

    prompt: list[_Message]
    completions: list[list[_Message]]
    names: tuple[str, ...]
    branches: list[int]


def split_implicit_prompt(
    chosen: str | list[_Message], rejected: str | list[_Message]
) -> tuple[Any, Any, Any] | str:
    """``(prompt, chosen, rejected)`` of two conversations (or texts) that share their start, or
    the reason they cannot be split.

    Conversations: the prompt is their longest common run of leading messages. Texts: the longest
    common prefix, ended before the last whitespace in it so that no word is split (the
    whitespace starts the completions, as byte-level BPE writes it before a word).
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        return "chosen and rejected must both be texts or both be conversations"
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str):
        assert isinstance(rejected, str)
        head = chosen[:n]
        cut = max(head.rfind(c) for c in " \n\t") if n < min(len(chosen), len(rejected)) else n
        n = cut if cut > 0 else 0
    if n == 0:
        return "no prompt: chosen and rejected share no leading text; give a prompt column"
    if n == len(chosen) or n == len(rejected):
        return "chosen or rejected holds nothing after the prompt they share"
    return chosen[:n], chosen[n:], rejected[n:]


def _as_messages(value: str | list[_Message], role: str) -> list[_Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _valid_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


def preference_turns(
    record: Mapping[str, Any], *, system: str | None = None, where: str | None = None
) -> Ok[PreferenceTurns] | Err:
    """The prompt and completion messages of a canonical preference record.

    A string prompt is one user message and a string completion one assistant message; the
    record's own ``system`` (string formats) or ``system`` (the default system prompt) becomes a
    leading system message unless the prompt starts with one. A record without a prompt is split
    by :func:`split_implicit_prompt`.

    Returns:
        ``Err`` for a missing or malformed field, an empty completion, or chosen/rejected that
        cannot be split.
    """
    kind = preference_kind(record)
    if kind is None:
        return Err(
            "not preference data (no chosen/rejected, no completion with a label)", None, where
        )
    names: tuple[str, ...] = ("chosen", "rejected") if kind == "paired" else ("completion",)
    values = [record[n] for n in names]
    for name, value in zip(names, values, strict=True):
        if isinstance(value, str):
            if not value.strip():
                return Err(f"{name} empty", None, where)
        elif not _valid_messages(value):
            return Err(f"{name} not a string or a list of {{role, content}} messages", None, where)
        elif not "".join(m["content"] for m in value).strip():
            return Err(f"{name} empty (its messages have no content)", None, where)
    prompt = record.get("prompt")
    if prompt is None:
        if kind == "unpaired":
            return Err("prompt missing", None, where)
        split = split_implicit_prompt(values[0], values[1])
        if isinstance(split, str):
            return Err(split, None, where)
        prompt, *values = split
    elif isinstance(prompt, str):
        if isinstance(values[0], list) and not prompt.strip():
            return Err("prompt empty", None, where)
    elif not _valid_messages(prompt):
        return Err("prompt not a string or a list of {role, content} messages", None, where)
    messages = _as_messages(prompt, "user")
    own = record.get("system")
    for sys_text in (own if isinstance(own, str) and own else None, system):
        if sys_text is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": sys_text})
    branches = list(PAIRED_BRANCHES)
    if kind == "unpaired":
        branches = [DESIRABLE if record["label"] else UNDESIRABLE]
    completions = [_as_messages(v, "assistant") for v in values]
    return Ok(PreferenceTurns(messages, completions, names, branches))


def render_preference(
    turns: PreferenceTurns, template: ChatTemplate | str, *, where: str | None = None
) -> Ok[tuple[str, list[str]]] | Err:
    """``(prompt text, [completion text, …])``: the prompt rendered with the generation prompt,
    and each completion as the rendered prompt + completion minus that prompt text.

    Returns:
        ``Err`` when the template fails or does not render the prompt as the start of prompt +
        completion (a completion that does not start with an assistant turn, or a template that
        rewrites earlier turns).
    """
    tpl = get_template(template)
    try:
        prompt_text = render_messages(tpl, turns.prompt, add_generation_prompt=True)
        texts = []
        for name, completion in zip(turns.names, turns.completions, strict=True):
            whole = render_messages(tpl, [*turns.prompt, *completion])
            if not whole.startswith(prompt_text):
                return Err(
                    f"template {tpl.name!r} does not render the prompt (with the generation "
                    f"prompt) as the start of prompt + {name}, so the {name} text cannot be "
                    f"cut off it (does the {name} start with an assistant message?)",
                    None,
                    where,
                )
            texts.append(whole[len(prompt_text) :])
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names
        return Err(f"template {tpl.name!r} failed: {e}", None, where)
    except (TypeError, ValueError, KeyError, IndexError) as e:  # e.g. None + str in a template
        return Err(f"template {tpl.name!r} failed: {type(e).__name__}: {e}", None, where)
    return Ok((prompt_text, texts))


# --------------------------------------------------------------------------------------------
# Length budgets
# --------------------------------------------------------------------------------------------


@attrs.frozen
class PreferenceLimits:
    """Token limits of a preference example (None: no limit): the prompt, each completion,
    and the prompt + the longest completion."""

    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    max_length: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("max_prompt_length", "max_completion_length", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise DataError(f"{name} must be at least 1 (or None: no limit), got {value!r}")


def _cut_left(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` tokens of ``ids``; a leading BOS stays first (it counts in ``keep``)."""
    if len(ids) <= keep:
        return ids
    if bos_id is not None and ids[:1] == [bos_id] and keep >= 1:
        return [bos_id, *ids[len(ids) - keep + 1 :]]
    return ids[len(ids) - keep :]


def fit_preference(
    prompt_ids: list[int],
    completions: list[list[int]],
    names: Sequence[str],
    limits: PreferenceLimits,
    *,
    bos_id: int | None,
) -> tuple[list[int], list[list[int]], dict[str, str]]:
    """The prompt cut from the left (to ``max_prompt_length``, then until it and the longest
    completion fit ``max_length``, down to its BOS and one more token), then each completion
    cut from the right (to ``max_completion_length``, then to what ``max_length`` leaves).

    Returns:
        ``(prompt_ids, completions, cuts)``; ``cuts`` maps each cut part (``prompt`` or a
        completion's name) to the limit that cut it last. A completion may come back empty:
        the caller refuses it.
    """
    cuts: dict[str, str] = {}
    lead = 1 if bos_id is not None and prompt_ids[:1] == [bos_id] else 0
    prompt = prompt_ids
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        prompt = _cut_left(prompt, limits.max_prompt_length, bos_id)
        cuts["prompt"] = "max_prompt_length"
    out = []
    for name, ids in zip(names, completions, strict=True):
        if limits.max_completion_length is not None and len(ids) > limits.max_completion_length:
            ids = ids[: limits.max_completion_length]
            cuts[name] = "max_completion_length"
        out.append(ids)
    total = limits.max_length
    longest = max(map(len, out))
    if total is not None and len(prompt) + longest > total:
        keep = max(total - longest, min(len(prompt), lead + 1))  # never below BOS + one token
        if keep < len(prompt):
            prompt = _cut_left(prompt, keep, bos_id)
            cuts["prompt"] = "max_length"
        room = total - len(prompt)
        for i, name in enumerate(names):
            if len(out[i]) > room:
                out[i] = out[i][: max(room, 0)]
                cuts[name] = "max_length"
    return prompt, out, cuts


# --------------------------------------------------------------------------------------------
# Records → examples
# --------------------------------------------------------------------------------------------


def encode_preferences(
    records: Sequence[Mapping[str, Any]],
    template: ChatTemplate | str,
    encoder: Encoder,
    *,
    unpaired: bool = False,
    system: str | None = None,
    limits: PreferenceLimits | None = None,
    where: Sequence[str | None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    margins: bool = False,
) -> tuple[list[Ok[dict] | Err], LengthReport]:
    """``Ok({"prompt_ids", "completions", "branches"})`` or ``Err`` per record, in order, and
    the length report (``truncated[part][limit]`` counts the cut parts). With ``margins`` the
    example of a record with a ``margin`` column also holds ``"margin"`` (a float).

    Args:
        records: canonical preference records (see the module doc).
        template: the run's template (``plain``: strings stay as they are).
        encoder: the tokenizer with its special tokens and BOS rule.
        unpaired: the records are KTO's (prompt, completion, label), else pairs.
        system: the default system prompt (``data.system_prompt``).
        limits: the token limits (None: none).
        where: each record's place (``"train.jsonl:line 3"``) for its ``Err``.
        chunk_rows: records whose texts go to one ``encode_batch`` call.
        margins: read each record's ``margin`` (:func:`record_margin`; a bad one is an
            ``Err``); else the column is ignored.

    Raises:
        DataError: a record of the other kind (SFT rows, unpaired rows for a paired task …),
            in one line naming it and the ``task.type`` to set.
    """
    tpl = get_template(template)
    limits = limits if limits is not None else PreferenceLimits()
    places = list(where) if where is not None else [f"record {i}" for i in range(len(records))]
    if len(places) != len(records):
        raise DataError(f"{len(places)} places for {len(records)} records")
    _refuse_other_records(records, places, unpaired=unpaired)
    tok = encoder.tokenizer
    bos = [encoder.bos_id] if encoder.adds_bos and encoder.bos_id is not None else []
    out: list[Ok[dict] | Err] = []
    report = LengthReport()
    for lo in range(0, len(records), chunk_rows):
        rendered: list[tuple[int, PreferenceTurns, str, list[str]] | Err] = []
        texts: list[str] = []
        for i in range(lo, min(lo + chunk_rows, len(records))):
            turns = preference_turns(records[i], system=system, where=places[i])
            if margins and isinstance(turns, Ok):
                margin = record_margin(records[i], where=places[i])
                turns = turns if isinstance(margin, Ok) else margin
            if isinstance(turns, Ok):
                got = render_preference(turns.value, tpl, where=places[i])
                if isinstance(got, Ok):
                    prompt_text, completion_texts = got.value
                    rendered.append((i, turns.value, prompt_text, completion_texts))
                    texts += [prompt_text, *completion_texts]
                    continue
                turns = got
            rendered.append(turns)
        encoded = iter(tok.encode_batch(texts, add_special_tokens=False) if texts else [])
        for item in rendered:
            if isinstance(item, Err):
                out.append(item)
                report = report + LengthReport(records=1)
                continue
            i, turns, _, completion_texts = item
            prompt_ids = next(encoded).ids
            if bos and prompt_ids[:1] != bos:
                prompt_ids = [*bos, *prompt_ids]
            completions = []
            for _ in completion_texts:
                ids = next(encoded).ids
                completions.append(ids if encoder.eos_id in ids else [*ids, encoder.eos_id])
            res, rep = _fitted(prompt_ids, completions, turns, limits, encoder.bos_id, places[i])
            if margins and isinstance(res, Ok) and MARGIN in records[i]:
                res = Ok({**res.value, MARGIN: float(records[i][MARGIN])})
            out.append(res)
            report = report + rep
    # every Err carries its record (for the quarantine file)
    out = [
        attrs.evolve(r, record=dict(rec)) if isinstance(r, Err) else r
        for r, rec in zip(out, records, strict=True)
    ]
    return out, report


def _fitted(
    prompt_ids: list[int],
    completions: list[list[int]],
    turns: PreferenceTurns,
    limits: PreferenceLimits,
    bos_id: int | None,
    where: str | None,
) -> tuple[Ok[dict] | Err, LengthReport]:
    """One encoded record fitted to the limits: its example or ``Err``, and its report."""
    if not prompt_ids:
        why = "prompt empty: it renders as no token (and the tokenizer adds no BOS)"
        return Err(why, None, where), LengthReport(records=1)
    prompt, fitted, cuts = fit_preference(
        prompt_ids, completions, turns.names, limits, bos_id=bos_id
    )
    truncated = {part: {limit: 1} for part, limit in cuts.items()}
    for name, ids in zip(turns.names, fitted, strict=True):
        if not ids:
            why = (
                f"{name} empty after truncation: the prompt keeps {len(prompt)} tokens of "
                f"max_length {limits.max_length}; raise max_length or lower max_prompt_length"
            )
            rep = LengthReport(1, 0, truncated, {}, int(bool(cuts)), 0)
            return Err(why, None, where), rep
    example = {"prompt_ids": prompt, "completions": fitted, "branches": list(turns.branches)}
    return Ok(example), LengthReport(1, 1, truncated, {}, int(bool(cuts)), int(bool(cuts)))


def _limit(*values: int | None) -> int | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


def preference_examples(
    cfg_data: Any,
    encoder: Encoder,
    template: Any,
    *,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    unpaired: bool = False,
    margins: bool = False,
) -> Callable[..., tuple[list[Ok[dict] | Err], LengthReport]]:
    """The preference tasks' example stage (``tscale.train.data_build.ExampleStage``).

    ``stage(records, places, *, budget, max_length)`` encodes the records
    (:func:`encode_preferences`) with the overall limit the tighter of ``max_length`` and
    ``budget.max_total_length`` (the data section's token limits: prompt + the longest
    completion); ``data.length``'s character limits and cut strategies do not apply.

    Args:
        cfg_data: the ``data`` config section (its ``system_prompt`` is read).
        encoder: the run's tokenizer.
        template: the run's template: a ``SelectedTemplate`` (``data.template: auto`` without a
            chat template refuses chat data) or a :class:`ChatTemplate`.
        max_prompt_length, max_completion_length: token limits (None: none).
        unpaired: KTO's rows (prompt, completion, label) instead of pairs.
        margins: read the records' ``margin`` column (the reward task; see
            :func:`encode_preferences`).

    Raises:
        DataError: a limit below 1 (here); at call time, records of the other kind or chat
            records with no chat template (one line each).
    """
    system = getattr(cfg_data, "system_prompt", None)
    tpl: ChatTemplate = getattr(template, "template", template)
    plain_only = bool(getattr(template, "plain_only", False))
    PreferenceLimits(max_prompt_length, max_completion_length)  # checked now, not per call

    def stage(
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: LengthBudget | None,
        max_length: int | None,
    ) -> tuple[list[Ok[dict] | Err], LengthReport]:
        if plain_only:
            _refuse_chat_without_template(records, places, encoder)
        limits = PreferenceLimits(
            max_prompt_length,
            max_completion_length,
            _limit(max_length, budget.max_total_length if budget is not None else None),
        )
        return encode_preferences(
            records,
            tpl,
            encoder,
            unpaired=unpaired,
            system=system,
            limits=limits,
            where=places,
            margins=margins,
        )

    return stage


def _refuse_chat_without_template(
    records: Sequence[Mapping[str, Any]], places: Sequence[str], encoder: Encoder
) -> None:
    for record, where in zip(records, places, strict=True):
        if any(
            isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected", "completion")
        ):
            source = f" ({encoder.source})" if encoder.source else " (trained by tscale)"
            names = ", ".join(n for n in TEMPLATE_NAMES if n != "plain")
            raise DataError(
                f"{where}: data.template: auto, but the tokenizer{source} has no chat_template "
                "and the preference data is chat (messages): plain would glue the turns "
                f"together; set data.template to a built-in ({names}), a .jinja file or a "
                "Jinja2 string, or use a tokenizer folder with a chat template"
            )
