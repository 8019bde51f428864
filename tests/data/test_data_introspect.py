"""Introspection: format detection (synonyms, values, a user column_map), canonical records with
per-row Ok/Err, the offline hub, the seeded eval split and length statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tscale.core.result import Err, Ok
from tscale.data.introspect import (
    FORMAT_FIELDS,
    SourceInfo,
    canonical_row,
    canonicalize,
    detect_format,
    inspect_source,
    iter_canonical,
    length_histogram,
    make_eval_split,
)
from tscale.data.prompt import to_messages
from tscale.data.sources import load_source
from tscale.errors import DataError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
SHAREGPT = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Detection on files of each format
# ---------------------------------------------------------------------------------------------


def test_text_file(tmp_path, cache):
    (tmp_path / "corpus.txt").write_text("one line\nanother line\n")
    info = inspect_source(tmp_path / "corpus.txt", cache_dir=cache)
    assert (info.kind, info.builder, info.format) == ("files", "text", "text")
    assert dict(info.splits) == {"train": 2} and info.column_map == {"text": "text"}
    assert not info.has_eval_split


def test_prompt_completion_by_synonyms_in_csv(tmp_path, cache):
    pa.csv.write_csv(
        pa.table({"Question": ["2+2?", "3+3?"], "Answer": ["4", "6"], "id": [1, 2]}),
        str(tmp_path / "qa.csv"),
    )
    info = inspect_source(tmp_path / "qa.csv", cache_dir=cache)
    assert info.format == "prompt_completion"
    assert info.column_map == {"prompt": "Question", "completion": "Answer"}
    assert info.columns == ("Question", "Answer", "id") and info.features["id"] == "Value('int64')"
    assert canonicalize({"Question": "2+2?", "Answer": "4", "id": 1}, info) == Ok(
        {"prompt": "2+2?", "completion": "4"}
    )


def test_alpaca(tmp_path, cache):
    rows = [
        {"instruction": "Add", "input": "2 2", "output": "4"},
        {"instruction": "Hi", "output": "Hey"},
    ]
    info = inspect_source(jsonl(tmp_path / "a.jsonl", rows), cache_dir=cache)
    assert info.format == "alpaca"
    assert info.column_map == {"instruction": "instruction", "output": "output", "input": "input"}
    got = [
        r.value for r in iter_canonical(load_source(tmp_path / "a.jsonl", cache_dir=cache), info)
    ]
    assert got[1] == {"instruction": "Hi", "output": "Hey", "input": ""}  # one schema for all rows
    assert to_messages(got[0]).value[0]["content"] == "Add\n\n2 2"


def test_dolly_style_instruction_response_is_prompt_completion():
    fmt, mapping = detect_format(["instruction", "context", "response", "category"], [])
    assert (fmt, mapping) == (
        "prompt_completion",
        {"prompt": "instruction", "completion": "response"},
    )


def test_chat_in_parquet(tmp_path, cache):
    pq.write_table(
        pa.Table.from_pylist([{"messages": CHAT, "source": "x"}]), tmp_path / "c.parquet"
    )
    info = inspect_source(tmp_path / "c.parquet", cache_dir=cache)
    assert (info.format, info.column_map) == ("chat", {"messages": "messages"})
    assert canonicalize({"messages": CHAT, "source": "x"}, info) == Ok({"messages": CHAT})


def test_chat_found_by_values_under_an_unknown_name():
    fmt, mapping = detect_format(["id", "turns_v2"], [{"id": 1, "turns_v2": CHAT}])
    assert (fmt, mapping) == ("chat", {"messages": "turns_v2"})


def test_sharegpt_canonicalizes_to_messages(tmp_path, cache):
    rows = [
        {"conversations": SHAREGPT, "id": "a"},
        {"conversations": [{"from": "alien", "value": "?"}]},
    ]
    path = jsonl(tmp_path / "s.jsonl", rows)
    info = inspect_source(path, cache_dir=cache)
    assert (info.format, info.column_map) == ("sharegpt", {"messages": "conversations"})
    ok, bad = iter_canonical(load_source(path, cache_dir=cache), info)
    assert ok == Ok({"messages": CHAT})
    assert to_messages(ok.value) == Ok(CHAT)
    assert isinstance(bad, Err) and "unknown 'from' 'alien'" in bad.reason
    assert bad.where == f"{path}:row 2"


def test_preference_and_preference_chat(tmp_path, cache):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    info = inspect_source(jsonl(tmp_path / "p.jsonl", rows), cache_dir=cache)
    assert info.format == "preference"
    assert canonicalize(rows[0], info) == Ok(rows[0])
    chat_rows = [{"prompt": "hi", "chosen": CHAT, "rejected": [*CHAT[:1], CHAT[0]], "score": 1.0}]
    info = inspect_source(jsonl(tmp_path / "pc.jsonl", chat_rows), cache_dir=cache)
    assert info.format == "preference_chat"
    assert info.column_map == {"chosen": "chosen", "rejected": "rejected", "prompt": "prompt"}
    assert canonicalize(chat_rows[0], info).value["chosen"] == CHAT
    bad = canonicalize({**chat_rows[0], "rejected": "text"}, info, where="pc.jsonl:row 1")
    assert bad == Err(
        "rejected not a list of messages (column 'rejected' holds str)",
        {**chat_rows[0], "rejected": "text"},
        "pc.jsonl:row 1",
    )


def test_unknown_format_and_canonicalize_says_what_to_do():
    fmt, mapping = detect_format(["a", "b"], [{"a": "x", "b": "y"}])
    assert (fmt, mapping) == ("unknown", {})
    info = _info("unknown", {}, columns=("a", "b"))
    with pytest.raises(DataError, match=r"none of its columns \['a', 'b'\].*column_map"):
        canonicalize({"a": "x"}, info)


def test_every_format_is_detectable():
    cases = {
        "text": (["content"], [{"content": "x"}]),
        "prompt_completion": (["query", "target"], [{}]),
        "alpaca": (["instruction", "output"], [{}]),
        "chat": (["dialog"], [{"dialog": CHAT}]),
        "sharegpt": (["conversations"], [{"conversations": SHAREGPT}]),
        "preference": (["chosen", "rejected"], [{"chosen": "a", "rejected": "b"}]),
        "preference_chat": (["chosen", "rejected"], [{"chosen": CHAT, "rejected": CHAT}]),
        "unpaired_preference": (
            ["prompt", "completion", "label"],
            [{"prompt": "p", "completion": "c", "label": True}],
        ),
        "unpaired_preference_chat": (
            ["prompt", "completion", "label"],
            [{"prompt": CHAT[:1], "completion": CHAT[1:], "label": False}],
        ),
    }
    assert set(cases) == set(FORMAT_FIELDS)
    for fmt, (columns, rows) in cases.items():
        assert detect_format(columns, rows)[0] == fmt, fmt


# ---------------------------------------------------------------------------------------------
# column_map and forced formats
# ---------------------------------------------------------------------------------------------


def test_user_column_map_overrides_detection(tmp_path, cache):
    rows = [{"q": "2+2?", "a": "4", "answer": "wrong column"}]
    path = jsonl(tmp_path / "m.jsonl", rows)
    assert inspect_source(path, cache_dir=cache).format == "unknown"  # only "answer" is known
    info = inspect_source(path, column_map={"prompt": "q", "completion": "a"}, cache_dir=cache)
    assert (info.format, dict(info.column_map)) == (
        "prompt_completion",
        {"prompt": "q", "completion": "a"},
    )
    assert canonicalize(rows[0], info) == Ok({"prompt": "2+2?", "completion": "4"})


def test_column_map_errors_name_the_key_or_column():
    with pytest.raises(DataError, match=r"column_map key 'question' is not a canonical field"):
        detect_format(["q"], [], column_map={"question": "q"})
    with pytest.raises(DataError, match=r"to column 'qq', which the data does not have.*\['q'\]"):
        detect_format(["q"], [], column_map={"prompt": "qq"})


def test_forced_format_needs_its_fields():
    assert detect_format(["text", "prompt", "completion"], [], format="text")[0] == "text"
    with pytest.raises(DataError, match=r"format 'alpaca' needs the field\(s\) \['instruction'"):
        detect_format(["prompt", "completion"], [], format="alpaca")
    with pytest.raises(DataError, match=r"holds sharegpt turns.*use format sharegpt"):
        detect_format(["messages"], [{"messages": SHAREGPT}], format="chat")
    with pytest.raises(DataError, match=r"unknown data format 'csv'"):
        detect_format(["text"], [], format="csv")


# ---------------------------------------------------------------------------------------------
# Bad rows: Err with the row named
# ---------------------------------------------------------------------------------------------


def test_missing_value_wrong_type_and_empty_string_are_errs_with_the_row(tmp_path, cache):
    rows = [
        {"question": "fine", "answer": "yes"},
        {"question": "no answer"},  # row 2: missing
        {"question": "typed", "answer": 5},  # row 3: wrong type (datasets keeps it as Json)
        {"question": "empty", "answer": "  "},  # row 4: empty
        {"question": 7, "answer": "x"},  # row 5: wrong type in the prompt
    ]
    path = jsonl(tmp_path / "bad.jsonl", rows)
    info = inspect_source(path, cache_dir=cache)
    results = list(iter_canonical(load_source(path, cache_dir=cache), info))
    assert results[0] == Ok({"prompt": "fine", "completion": "yes"})
    errs = [(r.where, r.reason) for r in results[1:]]
    assert errs == [
        (f"{path}:row 2", "completion missing (column 'answer')"),
        (f"{path}:row 3", "completion not a string (column 'answer' holds int)"),
        (f"{path}:row 4", "completion empty (column 'answer')"),
        (f"{path}:row 5", "prompt not a string (column 'question' holds int)"),
    ]
    assert results[2].record["answer"] == 5  # the Err keeps the record for the quarantine


def test_bad_messages_are_errs():
    info = _info("chat", {"messages": "messages"})
    for value, why in [
        ([], "messages empty or not a list"),
        ("hi", "messages empty or not a list"),
        ([{"role": "user"}], "messages: message 0 content is not a string"),
        (["x"], "messages: message 0 is not an object"),
    ]:
        got = canonicalize({"messages": value}, info, where="f:row 1")
        assert got == Err(f"{why} (column 'messages')", {"messages": value}, "f:row 1")


def test_a_malformed_line_is_counted_and_named_and_the_rest_inspected(tmp_path, cache):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a" "completion": "b"}\n')
    info = inspect_source(path, cache_dir=cache)
    assert dict(info.splits) == {"train": 1} and info.format == "prompt_completion"
    assert info.bad_rows == 1 and info.first_bad is not None
    assert re.search(r"broken\.jsonl:line 3: invalid JSON line", info.first_bad)
    assert "bad rows (train): 1" in info.summary()
    path.write_text("nope\n[1]\n")
    with pytest.raises(
        DataError, match=r"broken\.jsonl: none of its 2 rows .*broken\.jsonl:line 1"
    ):
        inspect_source(path, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------


def test_offline_hub_name_is_a_clear_data_error(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        inspect_source("tatsu-lab/alpaca", cache_dir=cache)
    msg = str(e.value)
    assert "Hugging Face Hub is unreachable" in msg and "'tatsu-lab/alpaca'" in msg
    assert "Pass local files instead" in msg


# ---------------------------------------------------------------------------------------------
# Eval split and lengths
# ---------------------------------------------------------------------------------------------


@given(n=st.integers(2, 300), frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_eval_split_is_seeded_disjoint_and_complete(n, frac, seed):
    train, held = make_eval_split(n, size=frac, seed=seed)
    assert (train, held) == make_eval_split(n, size=frac, seed=seed)
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(n))
    assert held == sorted(held) and len(held) >= 1 and len(train) >= 1


def test_eval_split_by_count_and_bad_sizes():
    train, held = make_eval_split(10, size=3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert make_eval_split(10, size=3, seed=1) != (train, held)
    for size in (0, 10, 1.0, 0.0, True):
        with pytest.raises(DataError, match=r"eval size"):
            make_eval_split(10, size=size, seed=0)


def test_length_histogram():
    stats = length_histogram(list(range(1, 101)), max_length=90)
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"]) == (50, 90, 99, 100)
    assert (stats["count"], stats["min"], stats["mean"]) == (100, 1, 50.5)
    assert (stats["over_budget"], stats["over_budget_fraction"]) == (10, 0.1)
    assert sum(c for _, _, c in stats["bins"]) == 100 and stats["bins"][-1][1] == 100
    empty = length_histogram([], max_length=8)
    assert (empty["count"], empty["p50"], empty["over_budget"]) == (0, None, 0)
    with pytest.raises(DataError, match=r"max_length"):
        length_histogram([1], max_length=0)


def test_summary_names_splits_format_and_mapping(tmp_path, cache):
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    jsonl(tmp_path / "d" / "validation.jsonl", [{"prompt": "a", "completion": "b"}])
    info = inspect_source(tmp_path / "d", cache_dir=cache)
    assert dict(info.splits) == {"train": 3, "validation": 1} and info.has_eval_split
    text = info.summary()
    assert "train: 3 rows" in text and "format: prompt_completion" in text
    assert "prompt ← prompt" in text


def _info(fmt: str, mapping: dict[str, str], columns: tuple[str, ...] = ()) -> SourceInfo:
    return SourceInfo(
        spec="mem",
        kind="files",
        builder="json",
        configs=(),
        config=None,
        splits={"train": 1},
        split="train",
        columns=columns or tuple(mapping.values()),
        features={},
        format=fmt,
        column_map=mapping,
        sample_size=1,
    )


def test_hub_path_reads_configs_splits_and_a_streamed_sample(monkeypatch):
    """The hub code path, with ``datasets``' hub functions replaced by local stand-ins."""
    rows = [{"question": "q", "answer": "a"}] * 3
    local = datasets.Dataset.from_list(rows)
    info = datasets.DatasetInfo(
        features=local.features,
        splits=datasets.SplitDict(
            {"train": datasets.SplitInfo("train", num_examples=3)}, dataset_name="x"
        ),
    )
    calls = []

    class Builder:
        def __init__(self) -> None:
            self.info = info

    def load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return local.to_iterable_dataset()

    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name: ["main", "extra"])
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: Builder())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = inspect_source("owner/qa", sample_rows=2)
    assert (got.kind, got.configs, got.config, dict(got.splits)) == (
        "hub",
        ("main", "extra"),
        "main",
        {"train": 3},
    )
    assert (got.format, got.sample_size) == ("prompt_completion", 2)
    assert calls == [("owner/qa", "main", "train", True)]
    assert "configs: main, extra" in got.summary()


def test_canonical_row_reads_a_row_in_its_own_shape_unless_the_format_is_forced():
    source = _info("chat", {"messages": "messages"})
    row = {"instruction": "i", "input": "", "output": "o", "system": None}
    got, shape = canonical_row(row, source, where="f:line 3")
    assert shape == "alpaca" and got == Ok({"instruction": "i", "output": "o", "input": ""})
    got, shape = canonical_row(row, source, where="f:line 3", per_row=False)
    assert shape == "chat" and isinstance(got, Err) and got.reason.startswith("messages missing")
    got, shape = canonical_row({"messages": CHAT}, source, where="f:line 4")
    assert (shape, got) == ("chat", Ok({"messages": CHAT}))
    got, shape = canonical_row({"a": 1}, None, where="f:line 5")
    assert shape == "unknown" and isinstance(got, Err) and got.where == "f:line 5"
    assert got.reason.startswith("no known columns: a")
