"""prepare_examples equals the per-record chain fit_record → render → tokenize_rendered:
same ids, labels, Err reasons and places, and the same length report."""

from __future__ import annotations

import random

import attrs
import pytest

from tscale.core.result import Err, Ok
from tscale.data import Encoder, train_tokenizer
from tscale.data.length import Dropped, LengthBudget, LengthReport, answer_text
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import (
    get_template,
    make_sample_counter,
    render,
    tokenize_rendered,
)

SENTENCE = "the cat sat on a mat. why? because it was warm! then it slept, and dreamt"
WORDS = SENTENCE.split(" ")


def _text(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def _records(seed: int) -> list[dict]:
    r = random.Random(seed)
    out: list[dict] = []
    for i in range(120):
        kind = i % 6
        if kind == 0:
            out.append(
                {"prompt": _text(r, r.randint(1, 40)), "completion": _text(r, r.randint(1, 60))}
            )
        elif kind == 1:
            out.append(
                {
                    "instruction": _text(r, r.randint(1, 9)),
                    "input": _text(r, r.randint(0, 30)),
                    "output": _text(r, r.randint(1, 50)),
                }
            )
        elif kind == 2:
            turns = []
            for _ in range(r.randint(1, 3)):
                turns += [
                    {"role": "user", "content": _text(r, r.randint(1, 12))},
                    {"role": "assistant", "content": _text(r, r.randint(0, 20))},
                ]
            out.append({"messages": turns})
        elif kind == 3:
            out.append({"prompt": _text(r, 3), "completion": 7})  # a bad record
        elif kind == 4:
            out.append({"messages": [{"role": "user", "content": "no reply"}]})
        else:
            out.append(
                {"prompt": "", "completion": _text(r, r.randint(1, 5)), "system": "Be kind."}
            )
    return out


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    tok = train_tokenizer([" ".join(WORDS)] * 20, 300)
    return Encoder.from_tokenizer(tok)


def _chain(records, template, encoder, *, loss_mode, max_length, budget, system):
    """The per-record chain: a record that does not render is an Err as it is; the others are
    fitted, rendered and tokenized. Returns the results, the report and which answers were cut."""
    tpl = get_template(template)
    counter = make_sample_counter(tpl, encoder, add_bos=True, add_eos=True, system=system)

    def count_tokens(text: str) -> int:
        return len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)

    out, report, cut = [], LengthReport(), []
    for i, rec in enumerate(records):
        where = f"row {i}"
        res = render(rec, tpl, system=system, loss_mode=loss_mode, where=where)
        cut.append(False)
        if isinstance(res, Err):  # malformed: never fitted
            out.append(res)
            continue
        res, rep = Ok(rec), LengthReport()
        if budget is not None:
            res, rep = budget.fit(rec, count_tokens=count_tokens, count_total=counter, where=where)
            cut[-1] = isinstance(res, Ok) and answer_text(res.value) != answer_text(rec)
        if isinstance(res, Ok):
            res = render(res.value, tpl, system=system, loss_mode=loss_mode, where=where)
        if isinstance(res, Ok):
            res = tokenize_rendered(
                res.value, encoder, add_bos=True, add_eos=True, max_length=max_length, where=where
            )
        if isinstance(res, Ok) and rep.truncated_records:
            rep = attrs.evolve(rep, truncated_examples=1)
        report = report + rep
        out.append(res)
    return out, report, cut


def _same(a, b, cut=None) -> None:
    """Equal results; where the answer was cut, ``a`` trains what ``b`` trains up to the cut
    answer's last token and nothing after it (its end of turn and EOS carry no loss)."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if cut and cut[i] and isinstance(y, Ok) and isinstance(x, Dropped):
            continue  # only the end of turn was left to train: checked in test_data_report
        assert type(x) is type(y)
        if isinstance(x, Ok) and cut and cut[i]:
            assert x.value["input_ids"] == y.value["input_ids"]
            got, want = x.value["labels"], y.value["labels"]
            last = max(t for t, v in enumerate(got) if v != -100)
            assert got[: last + 1] == want[: last + 1]
            assert all(v == -100 for v in got[last + 1 :])
            assert any(v != -100 for v in want[last + 1 :])  # the end of turn was trained there
        elif isinstance(x, Ok):
            assert x.value == y.value
        else:
            assert isinstance(x, Err) and (x.reason, x.where) == (y.reason, y.where)


@pytest.mark.parametrize(
    ("template", "loss_mode", "budget", "system"),
    [
        ("plain", "assistant_only", None, None),
        ("chatml", "assistant_only", LengthBudget(max_total_length=120), "Be brief."),
        ("alpaca", "last_turn_only", LengthBudget(max_total_length=150, excess="drop"), None),
        ("llama-3", "completion_only", LengthBudget(per_column_limits={"prompt": 30}), None),
        (
            "chatml",
            "assistant_only",
            LengthBudget(
                max_total_length=110,
                strategy="word_boundary",
                sides={"prompt": "left", "output": "left"},
                content_distribution="priority",
                priority=["completion", "output", "prompt", "instruction", "input"],
            ),
            None,
        ),
    ],
)
@pytest.mark.parametrize("chunk_rows", [7, 2048])
def test_prepare_examples_equals_the_per_record_chain(
    encoder, template, loss_mode, budget, system, chunk_rows
):
    records = _records(len(template) + chunk_rows)
    places = [f"row {i}" for i in range(len(records))]
    got, got_report = prepare_examples(
        records, template, encoder, add_bos=True, add_eos=True, system=system,
        loss_mode=loss_mode, max_length=160, budget=budget, where=places, chunk_rows=chunk_rows,
    )  # fmt: skip
    want, want_report, cut = _chain(
        records, template, encoder, loss_mode=loss_mode, max_length=160, budget=budget,
        system=system,
    )  # fmt: skip
    _same(got, want, cut)
    assert got_report == want_report
    assert any(isinstance(x, Ok) for x in got) and any(isinstance(x, Err) for x in got)
    if budget is not None and budget.max_total_length is not None and budget.excess == "truncate":
        assert got_report.truncated_records > 0
