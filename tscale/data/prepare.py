"""Records → tokenized examples in batches: fit → render → tokenize, each text encoded once.

:func:`prepare_examples` gives, for many records, what the per-record chain
``render (malformed: Err) → fit_record/fit_chat → render → tokenize_rendered`` gives (same
``input_ids``, same labels, same ``Err`` reasons, same :class:`~tscale.data.length.LengthReport`),
faster:

- every record is rendered once and its text encoded once, by the tokenizer's ``encode_batch``
  (parallel in Rust), with character offsets that map the trained spans to tokens;
- the length budget is checked on that encoding: a record that already fits (the common case) is
  not fitted, rendered or encoded again. Only a record over a limit takes the per-record path,
  through :meth:`LengthBudget.fit` with :func:`~tscale.data.prompt.make_sample_counter` as
  ``count_total``; a record that does not render is an ``Err`` as it is (never fitted).

One difference from the plain chain, on purpose: when the fit cut a record's answer (its
completion, output or last assistant turn), the trained span ends with the cut text, so the
turn's end-of-turn text and the EOS carry no loss (the model is not taught to stop mid-answer).

Pure: no I/O; the caller writes the ``Err`` results to its quarantine file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from tokenizers import Tokenizer

from tscale.core.result import Err, Ok
from tscale.data.length import Dropped, LengthBudget, LengthReport, answer_text
from tscale.data.prompt import (
    ChatTemplate,
    RenderedSample,
    _resolve,
    _special_ids,
    get_template,
    make_sample_counter,
    render,
    sample_length,
    tokenize_encoded,
)
from tscale.data.tokenize import IGNORE_INDEX, Encoder
from tscale.errors import DataError

CHUNK_ROWS = 2048
"""Records rendered and encoded per ``encode_batch`` call (bounds the memory of encodings)."""


def prepare_examples(
    records: Sequence[Mapping[str, Any]],
    template: str | ChatTemplate,
    tokenizer: Tokenizer | Encoder,
    *,
    add_bos: bool,
    add_eos: bool,
    system: str | None = None,
    loss_mode: str = "assistant_only",
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_length: int | None = None,
    budget: LengthBudget | None = None,
    where: Sequence[str | None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[list[Ok[dict] | Err], LengthReport]:
    """``Ok({"input_ids", "labels"})`` or ``Err`` per record, in order, and the length report.

    Args:
        records: canonical records (see :func:`tscale.data.prompt.to_messages`).
        template, system, loss_mode: as for :func:`tscale.data.prompt.render`.
        add_bos, add_eos, bos_id, eos_id, max_length: as for
            :func:`tscale.data.prompt.tokenize_rendered`.
        budget: the length budget fitted before rendering (None: no fitting; the report is
            empty). ``budget.max_total_length`` counts the finished sample's tokens.
        where: each record's place (``"train.jsonl:row 3"``) for its ``Err``.
        chunk_rows: records per batch of encoding.

    Raises:
        DataError: an unknown template or loss mode, missing special-token ids, bad budget
            arguments, or a record over a limit with ``budget.excess == "raise"``.
    """
    tpl = get_template(template)
    tok, bos, eos = _resolve(tokenizer, bos_id, eos_id)
    _special_ids(add_bos, add_eos, bos, eos)
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be >= 1, got {chunk_rows}")
    places = list(where) if where is not None else [None] * len(records)
    if len(places) != len(records):
        raise DataError(f"{len(places)} places for {len(records)} records")
    special = {"add_bos": add_bos, "add_eos": add_eos, "bos_id": bos, "eos_id": eos}
    out: list[Ok[dict] | Err] = []
    report = LengthReport()
    slow: list[int] = []  # records that take the per-record path (over a limit, or no render)
    unchanged = 0  # records the budget leaves as they are
    for lo in range(0, len(records), chunk_rows):
        hi = min(lo + chunk_rows, len(records))
        rendered = [
            render(records[i], tpl, system=system, loss_mode=loss_mode, where=places[i])
            for i in range(lo, hi)
        ]
        texts = [r.value.text for r in rendered if isinstance(r, Ok)]
        encodings = iter(tok.encode_batch(texts, add_special_tokens=False))
        for i, res in zip(range(lo, hi), rendered, strict=True):
            if not isinstance(res, Ok):  # malformed: quarantined as it is, never fitted
                out.append(res)
                continue
            enc = next(encodings)
            if budget is not None:
                n = sample_length(enc.ids, **special)
                if budget.needs_fit(records[i], n):
                    slow.append(i)
                    out.append(res)  # replaced below
                    continue
                unchanged += 1
            out.append(
                tokenize_encoded(
                    res.value,
                    enc.ids,
                    enc.offsets,
                    max_length=max_length,
                    where=places[i],
                    **special,
                )
            )
    if budget is None:
        return out, report
    report = LengthReport(unchanged, unchanged, {}, {})
    if slow:
        count_total = make_sample_counter(tpl, tok, system=system, **special)

        def count_tokens(text: str) -> int:
            return len(tok.encode(text, add_special_tokens=False).ids)

        for i in slow:
            res, rep = budget.fit(
                records[i], count_tokens=count_tokens, count_total=count_total, where=places[i]
            )
            answer = answer_text(res.value) if isinstance(res, Ok) else None
            if answer == answer_text(records[i]):
                answer = None  # the answer was not cut: its end of turn and EOS stay trained
            if isinstance(res, Ok):
                res = render(res.value, tpl, system=system, loss_mode=loss_mode, where=places[i])
            if isinstance(res, Ok):
                res = _tokenize_fitted(
                    res.value, answer, tok, max_length=max_length, where=places[i], **special
                )
            if isinstance(res, Ok) and rep.truncated_records:
                rep = attrs.evolve(rep, truncated_examples=1)
            report = report + rep
            out[i] = res
    return out, report


def _tokenize_fitted(
    sample: RenderedSample,
    answer: str | None,
    tok: Tokenizer,
    *,
    add_bos: bool,
    add_eos: bool,
    bos_id: int | None,
    eos_id: int | None,
    max_length: int | None,
    where: str | None,
) -> Ok[dict] | Err:
    """:func:`tokenize_rendered` of a fitted sample; when its last trained turn was cut
    (``answer`` is the cut text), the trained span ends where the cut answer ends: the turn's
    end-of-turn text and the EOS stay in ``input_ids`` but carry no loss, so the model is not
    taught to stop where the cut fell."""
    spans = sample.trained_spans
    needle = (answer or "").strip()
    cut_at = sample.text.rfind(needle, *spans[-1]) if needle and spans else -1
    if cut_at >= 0:  # (a template that rewrites the content: the span stays as rendered)
        end = cut_at + len(needle)
        sample = attrs.evolve(sample, trained_spans=(*spans[:-1], (spans[-1][0], end)))
    enc = tok.encode(sample.text, add_special_tokens=False)
    res = tokenize_encoded(
        sample,
        enc.ids,
        enc.offsets,
        add_bos=add_bos,
        add_eos=add_eos,
        bos_id=bos_id,
        eos_id=eos_id,
        max_length=max_length,
        where=where,
    )
    if cut_at < 0 or not isinstance(res, Ok):
        return res
    ids, labels = res.value["input_ids"], res.value["labels"]
    appended_eos = add_eos and len(ids) > 1 and eos_id not in enc.ids  # tokenize_encoded's rule
    if appended_eos and labels[-2] != IGNORE_INDEX:  # trained when nothing follows the span
        labels[-2] = IGNORE_INDEX
        if all(x == IGNORE_INDEX for x in labels):
            return Dropped(
                "nothing trainable fits: no token of the cut answer is left to train", None, where
            )
    return res
