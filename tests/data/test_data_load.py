"""The one reader: bad rows (and bad lines) are quarantined with their file:line, counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tscale.core.result import Err, Ok
from tscale.data import load_records, validate_record, write_jsonl
from tscale.errors import DataError


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"  # keep the datasets cache out of the home directory


def read_quarantine(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_bad_rows_are_quarantined_and_counted(tmp_path, hf_cache):
    rows = [
        {"prompt": "a", "completion": " b"},
        {"prompt": "c"},  # row 2: completion missing
        {"prompt": 5, "completion": " d"},  # row 3: prompt not a string
        {"prompt": "e", "completion": ""},  # row 4: completion empty
        {"prompt": "", "completion": " f"},  # an empty prompt is allowed
        {"prompt": None, "completion": " g"},  # row 6: prompt missing (null)
    ]
    data = write_lines(tmp_path / "data.jsonl", rows)
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    records, report = load_records([data], quarantine=quarantine, cache_dir=hf_cache)

    assert [(r["prompt"], r["completion"]) for r in records] == [("a", " b"), ("", " f")]
    assert (report.total, report.kept, report.rejected) == (6, 2, 4)
    assert report.errors == {
        "completion missing": 1,
        "prompt not a string": 1,
        "completion empty": 1,
        "prompt missing": 1,
    }
    q = read_quarantine(quarantine)
    assert [(x["where"], x["reason"]) for x in q] == [
        (f"{data}:line 2", "completion missing"),
        (f"{data}:line 3", "prompt not a string"),
        (f"{data}:line 4", "completion empty"),
        (f"{data}:line 6", "prompt missing"),
    ]
    assert q[1]["record"]["prompt"] == 5
    assert "4 rejected" in report.summary() and str(quarantine) in report.summary()


def test_quarantine_is_appended_and_optional(tmp_path, hf_cache):
    data = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": 1}])
    quarantine = tmp_path / "q.jsonl"
    quarantine.write_text('{"earlier": true}\n')
    load_records([data], quarantine=quarantine, cache_dir=hf_cache)
    assert len(read_quarantine(quarantine)) == 2
    _, report = load_records([data], cache_dir=hf_cache)  # no file: still counted
    assert report.errors == {"prompt not a string": 1} and report.quarantine is None


def test_several_files_keep_order_and_extra_columns(tmp_path, hf_cache):
    a = write_jsonl([{"prompt": "p1", "completion": " c1", "task": "x"}], tmp_path / "a.jsonl")
    b = write_jsonl([{"prompt": "p2", "completion": " c2"}], tmp_path / "b.jsonl")
    records, report = load_records([str(a), b], cache_dir=hf_cache)
    assert [r["prompt"] for r in records] == ["p1", "p2"]
    assert records[0]["task"] == "x"
    assert report.files == (str(a), str(b)) and report.errors == {}


def test_all_rows_bad_is_an_error(tmp_path, hf_cache):
    data = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b", "completion": 3}])
    quarantine = tmp_path / "q.jsonl"
    with pytest.raises(DataError, match=r"all 2 rows of .*bad\.jsonl are invalid"):
        load_records([data], quarantine=quarantine, cache_dir=hf_cache)
    assert len(read_quarantine(quarantine)) == 2  # written before raising, for the user to look


def test_missing_file(tmp_path, hf_cache):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl"):
        load_records([tmp_path / "nope.jsonl"], cache_dir=hf_cache)


def test_a_bad_json_line_is_quarantined_and_a_file_without_json_is_an_error(tmp_path, hf_cache):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\nthis is not json\n\n[1, 2]\n')
    quarantine = tmp_path / "q.jsonl"
    records, report = load_records([data], quarantine=quarantine, cache_dir=hf_cache)
    assert records == [{"prompt": "a", "completion": " b"}]
    assert (report.total, report.errors) == (3, {"invalid JSON line": 1, "not a JSON object": 1})
    bad = read_quarantine(quarantine)
    assert [b["where"].split(":")[-1] for b in bad] == ["line 2", "line 4"]
    assert bad[0]["record"] == "this is not json"  # the line as it is, to fix
    not_json = tmp_path / "notes.jsonl"
    not_json.write_text("hello\nworld\n")
    with pytest.raises(DataError, match=r"all 2 rows of .*notes\.jsonl are invalid"):
        load_records([not_json], cache_dir=hf_cache)


def test_empty_file(tmp_path, hf_cache):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_records([data], cache_dir=hf_cache)


def test_other_column_names_are_detected_per_row_and_unknown_ones_quarantined(tmp_path, hf_cache):
    rows = [
        {"question": "q", "answer": "a"},
        {"instruction": "i", "output": "o"},
        {"prompt": "p", "completion": "c"},
        {"foo": 1, "bar": 2},
    ]
    data = write_lines(tmp_path / "d.jsonl", rows)
    quarantine = tmp_path / "q.jsonl"
    records, report = load_records([data], quarantine=quarantine, cache_dir=hf_cache)
    assert records[0] == {"prompt": "q", "completion": "a"}
    assert records[1]["instruction"] == "i" and records[1]["output"] == "o"
    assert records[2] == {"prompt": "p", "completion": "c"}
    assert report.shapes == {"prompt_completion": 2, "alpaca": 1}
    (bad,) = read_quarantine(quarantine)
    assert bad["where"] == f"{data}:line 4" and bad["reason"].startswith("no known columns: foo")
    only_bad = write_lines(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"all 1 rows of .*u\.jsonl are invalid.*no known columns"):
        load_records([only_bad], quarantine=quarantine, cache_dir=hf_cache)


def test_no_files():
    with pytest.raises(DataError, match="no data files"):
        load_records([])


def test_validate_record():
    assert validate_record({"prompt": "a", "completion": "b"}) == Ok(
        {"prompt": "a", "completion": "b"}
    )
    err = validate_record({"prompt": "a", "completion": ["b"]}, "f:row 1")
    assert err == Err("completion not a string", {"prompt": "a", "completion": ["b"]}, "f:row 1")
