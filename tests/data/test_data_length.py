"""Length manager: truncation strategies, budgets per distribution, excess policies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core.result import Err, Ok
from tscale.data import Encoder, train_tokenizer
from tscale.data.length import (
    Dropped,
    LengthBudget,
    LengthReport,
    allocate_budget,
    fit_record,
    fit_records,
    truncate_text,
    truncate_to_tokens,
)
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import make_sample_counter, render, tokenize_rendered
from tscale.errors import DataError

TEXT = 'The cat sat. "Then it ran!" Did it stop? Yes.\nA new line here'


def words(text: str) -> int:
    """A toy token count: one token per whitespace-separated word."""
    return len(text.split())


@pytest.mark.parametrize(
    ("strategy", "side", "limit", "expected"),
    [
        ("hard", "right", 10, "The cat sa"),
        ("hard", "left", 9, "line here"),
        ("word_boundary", "right", 10, "The cat"),
        ("word_boundary", "left", 12, "line here"),
        ("word_boundary", "right", 2, ""),  # the first word does not fit
        ("sentence_boundary", "right", 30, 'The cat sat. "Then it ran!"'),
        ("sentence_boundary", "right", 45, 'The cat sat. "Then it ran!" Did it stop? Yes.'),
        ("sentence_boundary", "left", 24, "Yes.\nA new line here"),  # a line break ends one
        ("sentence_boundary", "right", 11, ""),  # "The cat sat." has 12 characters
        ("smart", "right", 30, 'The cat sat. "Then it ran!"'),
        ("smart", "right", 11, "The cat"),  # no sentence fits: whole words
        ("smart", "right", 2, "Th"),  # no word fits: characters
        ("smart", "left", 18, "A new line here"),
        ("smart", "right", 1000, TEXT),  # within the limit: unchanged
    ],
)
def test_truncation_strategies(strategy, side, limit, expected):
    assert truncate_text(TEXT, limit, strategy=strategy, side=side) == expected


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab .!?\n", max_size=60),
    limit=st.integers(0, 70),
    strategy=st.sampled_from(["smart", "sentence_boundary", "word_boundary", "hard"]),
    side=st.sampled_from(["left", "right"]),
)
def test_truncation_stays_within_the_limit_and_keeps_an_end(text, limit, strategy, side):
    cut = truncate_text(text, limit, strategy=strategy, side=side)
    assert len(cut) <= limit
    if len(text) <= limit:
        assert cut == text
    elif side == "right":
        assert text.startswith(cut)
    else:
        assert text.endswith(cut)


def test_bad_truncation_arguments():
    with pytest.raises(DataError, match="strategy"):
        truncate_text(TEXT, 3, strategy="clever")
    with pytest.raises(DataError, match="side"):
        truncate_text(TEXT, 3, side="middle")
    with pytest.raises(DataError, match="max_chars"):
        truncate_text(TEXT, -1)


def test_truncate_to_tokens():
    assert truncate_to_tokens(TEXT, 3, words) == "The cat sat."
    assert truncate_to_tokens(TEXT, 4, words, side="left") == "A new line here"
    assert truncate_to_tokens(TEXT, 5, words, side="left") == "Yes.\nA new line here"
    assert truncate_to_tokens(TEXT, 2, words, strategy="word_boundary") == "The cat"
    assert truncate_to_tokens(TEXT, 0, words) == ""


def test_allocate_budget_modes():
    counts = {"a": 10, "b": 30, "c": 5}
    assert allocate_budget(counts, 100) == counts  # under budget: unchanged
    assert allocate_budget(counts, 18) == {"a": 4, "b": 12, "c": 2}  # 40% of each
    prio = allocate_budget(counts, 20, distribution="priority", priority=["c", "a", "b"])
    assert prio == {"a": 10, "b": 5, "c": 5}  # b is least important: cut first
    prio = allocate_budget(counts, 8, distribution="priority", priority=["c", "a", "b"])
    assert prio == {"a": 3, "b": 0, "c": 5}  # b emptied, then a trimmed
    ratio = allocate_budget(counts, 20, distribution="ratio", ratios={"a": 1, "b": 1, "c": 2})
    assert ratio == {"a": 8, "b": 7, "c": 5}  # c needs less than its half: a and b share the rest
    ratio = allocate_budget(counts, 20, distribution="ratio", ratios={"a": 1, "b": 3, "c": 1})
    assert ratio == {"a": 4, "b": 12, "c": 4}
    with pytest.raises(DataError, match="priority"):
        allocate_budget(counts, 5, distribution="priority", priority=["a", "b"])
    with pytest.raises(DataError, match="ratio"):
        allocate_budget(counts, 5, distribution="ratio", ratios={"a": 1, "b": 1, "c": 0})


RECORD = {
    "prompt": "Summarise this. It is long. It has many sentences. Each one adds words.",
    "completion": "Short. Long enough answer here.",
    "id": 7,
}


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(alphabet="abc .", max_size=80),
    completion=st.text(alphabet="xyz .", max_size=80),
    budget=st.integers(1, 30),
    overhead=st.integers(0, 5),
    mode=st.sampled_from(["proportional", "priority", "ratio"]),
)
def test_budget_without_count_total_counts_columns_plus_overhead(
    prompt, completion, budget, overhead, mode
):
    record = {"prompt": prompt, "completion": completion}
    result, report = fit_record(
        record,
        columns=["prompt", "completion"],
        count_tokens=words,
        max_total_length=budget,
        overhead_tokens=overhead,
        content_distribution=mode,
        priority=["completion", "prompt"],
        ratios={"prompt": 1.0, "completion": 2.0},
    )
    if budget < overhead:
        assert isinstance(result, Dropped)
        return
    if isinstance(result, Dropped):  # the answer would be cut to nothing: dropped, not emptied
        assert completion.strip() and result.reason.startswith("nothing trainable fits")
        return
    out = result.value
    assert words(out["prompt"]) + words(out["completion"]) + overhead <= budget
    assert report.records == report.kept == 1
    assert record == {"prompt": prompt, "completion": completion}  # input untouched


def test_per_column_limits_with_sides_and_strategies():
    result, report = fit_record(
        RECORD,
        columns=["prompt", "completion"],
        count_tokens=words,
        per_column_limits={"prompt": 30, "completion": 12},
        strategy={"prompt": "sentence_boundary", "completion": "hard"},
        sides={"prompt": "left"},
    )
    assert result.value == {
        "prompt": "Each one adds words.",
        "completion": "Short. Long ",
        "id": 7,
    }
    assert report.truncated == {"prompt": {"char_limit": 1}, "completion": {"char_limit": 1}}


def test_priority_budget_trims_the_least_important_column_first():
    result, report = fit_record(
        RECORD,
        columns=["prompt", "completion"],
        count_tokens=words,
        max_total_length=9,
        content_distribution="priority",
        priority=["completion", "prompt"],
    )
    out = result.value
    assert out["completion"] == RECORD["completion"]  # 5 words kept whole
    assert out["prompt"] == "Summarise this."  # 4 words of budget left: whole sentences
    assert report.truncated == {"prompt": {"token_budget": 1}}


def test_excess_policies():
    kwargs = {"columns": ["prompt", "completion"], "count_tokens": words, "max_total_length": 6}
    dropped, report = fit_record(RECORD, excess="drop", where="d.jsonl:row 4", **kwargs)
    assert isinstance(dropped, Err) and dropped.where == "d.jsonl:row 4"
    assert "18 tokens > max_total_length 6" in dropped.reason
    assert report.dropped == {"token_budget": 1} and report.kept == 0
    with pytest.raises(DataError, match=r"max_total_length 6 at d\.jsonl:row 4"):
        fit_record(RECORD, excess="raise", where="d.jsonl:row 4", **kwargs)
    kept, report = fit_record(RECORD, excess="truncate", **kwargs)
    assert isinstance(kept, Ok) and report.kept == 1
    over_chars, report = fit_record(
        RECORD, columns=["prompt"], count_tokens=words, per_column_limits={"prompt": 5},
        excess="drop",
    )  # fmt: skip
    assert isinstance(over_chars, Err) and report.dropped == {"char_limit:prompt": 1}
    with pytest.raises(DataError, match="excess"):
        fit_record(RECORD, excess="ignore", **kwargs)


def test_overhead_alone_over_budget_and_bad_records():
    result, _ = fit_record(
        RECORD, columns=["prompt"], count_tokens=words, max_total_length=3, overhead_tokens=4
    )
    assert isinstance(result, Err) and "alone takes 4" in result.reason
    result, report = fit_record({"prompt": 3}, columns=["prompt"], count_tokens=words)
    assert isinstance(result, Err) and "not a string" in result.reason
    assert report.dropped == {"invalid": 1}
    with pytest.raises(DataError, match="per_column_limits"):
        fit_record(RECORD, columns=["prompt"], count_tokens=words, per_column_limits={"x": 1})


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    texts = [RECORD["prompt"], RECORD["completion"], "the cat sat on the mat"] * 10
    tok = train_tokenizer(texts, 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Encoder.from_tokenizer(tok)


@pytest.mark.parametrize("template", ["chatml", "alpaca", "plain"])
def test_max_total_length_counts_template_and_special_tokens(encoder, template):
    count = make_sample_counter(template, encoder, add_bos=True, add_eos=True)
    columns = ["prompt", "completion"]
    tokens = encoder.tokenizer.encode
    content = sum(len(tokens(RECORD[c], add_special_tokens=False).ids) for c in columns)
    full = count(RECORD)
    assert full > content  # template text and BOS/EOS are part of the count
    limit = full - content // 2  # over by half the content: the template counts too
    result, report = fit_record(
        RECORD,
        columns=columns,
        count_tokens=lambda s: len(tokens(s, add_special_tokens=False).ids),
        max_total_length=limit,
        count_total=count,
    )
    out = result.value
    sample = render(out, template, loss_mode="completion_only").value
    ex = tokenize_rendered(sample, encoder, add_bos=True, add_eos=True).value
    assert len(ex["input_ids"]) == count(out) <= limit  # what max_total_length counts
    assert report.truncated  # something was cut to make room for the template


def test_count_total_failure_is_an_err(encoder):
    count = make_sample_counter("mistral", encoder, add_bos=False, add_eos=False)
    record = {"messages": [{"role": "system", "content": "x"}], "prompt": "p"}
    result, report = fit_record(
        record, columns=["prompt"], count_tokens=words, max_total_length=5, count_total=count
    )
    assert isinstance(result, Err) and result.reason.startswith("cannot count tokens")
    assert report.dropped == {"uncountable": 1}


def test_reports_aggregate():
    records = [RECORD, {"prompt": "a b", "completion": "c"}, {"prompt": 1, "completion": "c"}]
    results, report = fit_records(
        records, columns=["prompt", "completion"], count_tokens=words, max_total_length=6
    )
    assert [type(r) for r in results] == [Ok, Ok, Err]
    assert (report.records, report.kept) == (3, 2)
    assert report.truncated == {"prompt": {"token_budget": 1}, "completion": {"token_budget": 1}}
    total = report + LengthReport(1, 0, {"prompt": {"char_limit": 2}}, {"token_budget": 1})
    assert total.truncated["prompt"] == {"token_budget": 1, "char_limit": 2}
    assert total.dropped == {"invalid": 1, "token_budget": 1}
    assert total.summary().startswith("kept 2/4 records; truncated")


# --- over-long examples are truncated, not lost (data.length.excess) ----------------------------

SIDES = {"prompt": "left", "instruction": "left", "input": "left", "completion": "right"}


def _budget(limit: int, **kwargs) -> LengthBudget:
    """The budget the config's defaults give (balanced shares, prompt side cut from the left)."""
    kwargs = {"content_distribution": "balanced", "sides": SIDES, **kwargs}
    return LengthBudget(max_total_length=limit, limit_name="data.max_length", **kwargs)


def _prepare(encoder, records, limit, template="chatml", **kwargs):
    return prepare_examples(
        records, template, encoder, add_bos=True, add_eos=True, loss_mode="assistant_only",
        budget=_budget(limit, **kwargs), max_length=limit,
    )  # fmt: skip


SAY = "the cat sat on the mat and it was long enough"


def _say(n: int, k: int = 0) -> str:
    words = SAY.split(" ")
    return " ".join(words[(i + k) % len(words)] for i in range(n))


def _conversation(exchanges: int, *, answer_words: int = 6) -> dict:
    messages = [{"role": "system", "content": "Summarise this."}]
    for k in range(exchanges):
        messages.append({"role": "user", "content": f"turn {k}: " + _say(6, k)})
        messages.append({"role": "assistant", "content": _say(answer_words, k + 1)})
    return {"messages": messages}


def _trained_text(encoder, ex) -> str:
    """The text of the tokens that carry loss (labels are pre-shifted)."""
    ids = [t for t in ex["labels"] if t != -100]
    return encoder.tokenizer.decode(ids, skip_special_tokens=False)


def test_chat_keeps_the_system_prompt_and_drops_the_oldest_exchanges_first(encoder):
    record = _conversation(4)
    count = make_sample_counter("chatml", encoder, add_bos=True, add_eos=True)
    without_first = {"messages": record["messages"][:1] + record["messages"][3:]}
    limit = count(without_first)  # one exchange too many: the first one goes, only it
    assert count(record) > limit
    (res,), report = _prepare(encoder, [record], limit)
    fitted, _ = _budget(limit).fit(
        record, count_tokens=lambda s: len(encoder.tokenizer.encode(s).ids), count_total=count
    )
    assert fitted.value["messages"] == without_first["messages"]  # whole exchanges, in order
    assert len(res.value["input_ids"]) == limit
    assert report.truncated == {"turns": {"oldest_dropped": 1}} and report.truncated_examples == 1
    # every assistant turn still trains, with its end of turn (none of them was cut)
    assert _trained_text(encoder, res.value).count("<|im_end|>") == 3


@pytest.mark.parametrize("slack", [0, 3, 11, 25])
def test_chat_cuts_the_last_trained_turn_token_exactly(encoder, slack):
    record = _conversation(3, answer_words=60)
    count = make_sample_counter("chatml", encoder, add_bos=True, add_eos=True)
    last_exchange = {"messages": record["messages"][:1] + record["messages"][-2:]}
    answer = record["messages"][-1]["content"]
    limit = count({"messages": last_exchange["messages"][:2]}) + 40 + slack
    (res,), report = _prepare(encoder, [record], limit)
    ex = res.value
    assert len(ex["input_ids"]) <= limit  # token-exact
    assert limit - len(ex["input_ids"]) <= 4  # and close: only a cut word's tokens are lost
    text = encoder.tokenizer.decode(ex["input_ids"], skip_special_tokens=False)
    assert "Summarise this." in text and "turn 0" not in text and "turn 1" not in text
    assert "turn 2: " + _say(6, 2) in text  # the final user message is short: kept whole
    assert report.truncated["completion"] == {"token_budget": 1}
    trained = _trained_text(encoder, ex)
    # the cut answer trains up to its last word; its end of turn and the EOS carry no loss
    assert answer.startswith(trained.strip()) and len(trained.strip()) < len(answer)
    assert "<|im_end|>" not in trained and ex["labels"][-2] == -100
    assert ex["input_ids"][-1] == encoder.eos_id


def test_prompt_is_cut_from_the_left_and_the_completion_kept(encoder):
    record = {"prompt": _say(80), "completion": RECORD["completion"]}
    count = make_sample_counter("chatml", encoder, add_bos=True, add_eos=True)
    limit = count({**record, "prompt": _say(20)})
    (res,), report = _prepare(encoder, [record], limit)
    assert len(res.value["input_ids"]) <= limit
    fitted, _ = _budget(limit).fit(
        record, count_tokens=lambda s: len(encoder.tokenizer.encode(s).ids), count_total=count
    )
    assert fitted.value["completion"] == record["completion"]  # the answer is whole
    assert record["prompt"].endswith(fitted.value["prompt"]) and fitted.value["prompt"]
    assert report.truncated == {"prompt": {"token_budget": 1}}
    assert _trained_text(encoder, res.value).endswith("<|im_end|><|eos|>")  # not cut: stops


def test_both_long_share_the_budget_and_the_answer_is_cut_from_the_right(encoder):
    record = {"prompt": _say(80), "completion": _say(80, 3)}
    (res,), _ = _prepare(encoder, [record], 90)
    ex = res.value
    assert len(ex["input_ids"]) <= 90
    trained = _trained_text(encoder, ex).strip()
    assert record["completion"].startswith(trained) and len(trained.split()) >= 15


def test_drop_policy_and_what_cannot_fit_are_dropped_not_quarantined(encoder):
    long_chat = _conversation(4)
    (res,), report = _prepare(encoder, [long_chat], 60, excess="drop")
    assert isinstance(res, Dropped) and res.reason.startswith("too long: ")
    assert "> data.max_length 60" in res.reason and report.dropped == {"token_budget": 1}
    with pytest.raises(DataError, match=r"data\.max_length 60.*excess: raise"):
        _prepare(encoder, [long_chat], 60, excess="raise")
    huge_system = {
        "messages": [{"role": "system", "content": _say(80)}, *long_chat["messages"][1:3]]
    }
    (res,), _ = _prepare(encoder, [huge_system], 60)
    assert isinstance(res, Dropped) and res.reason.startswith("nothing trainable fits")
    malformed = {"messages": [{"content": "no role"}]}
    (res,), _ = _prepare(encoder, [malformed], 60)
    assert isinstance(res, Err) and not isinstance(res, Dropped)  # quarantined, never fitted


def test_a_cut_answer_does_not_train_the_eos_with_the_plain_template(encoder):
    whole = {"prompt": "the cat ", "completion": _say(8)}
    cut = {"prompt": "the cat ", "completion": _say(80)}
    (kept, shortened), _ = _prepare(encoder, [whole, cut], 40, template="plain")
    assert kept.value["labels"][-2] == encoder.eos_id  # a whole answer learns to stop
    ex = shortened.value
    assert len(ex["input_ids"]) <= 40 and ex["input_ids"][-1] == encoder.eos_id
    assert ex["labels"][-2] == -100 and ex["labels"][-3] != -100  # trained up to the cut only
