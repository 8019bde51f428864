"""The one reader (tscale.data.load.read_file): every line is a row or a quarantined Err at its
line, whatever the line ends, byte-order mark, blank lines or bad bytes; CSV and JSON documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tscale.core.result import Err, Ok
from tscale.data.load import expand_files, read_file, read_files
from tscale.errors import DataError

GOOD = st.dictionaries(
    st.sampled_from(["prompt", "completion", "messages", "x"]),
    st.one_of(st.text(max_size=20), st.integers(), st.none()),
    min_size=1,
)
BAD = st.sampled_from(
    [b"{oops", b"[1, 2]", b"42", b'"text"', b'{"prompt": "caf\xe9"}', b"\xff\xfe"]
)
LINE = st.one_of(
    GOOD.map(lambda r: ("good", r)), BAD.map(lambda b: ("bad", b)), st.just(("blank", b"  "))
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(LINE, min_size=1, max_size=12), crlf=st.booleans(), bom=st.booleans())
def test_every_line_is_a_row_or_an_err_at_its_line(tmp_path: Path, lines, crlf: bool, bom: bool):
    end = b"\r\n" if crlf else b"\n"
    body = b"".join(
        (json.dumps(v, ensure_ascii=False).encode() if kind == "good" else v) + end
        for kind, v in lines
    )
    if not any(kind != "blank" for kind, _ in lines):
        return  # a file of blank lines is empty: tested below
    path = tmp_path / "f.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
    got = list(read_file(path))
    expected = [(n, kind, v) for n, (kind, v) in enumerate(lines, start=1) if kind != "blank"]
    assert len(got) == len(expected)
    for (row, where), (n, kind, value) in zip(got, expected, strict=True):
        assert where == f"{path}:line {n}"
        if kind == "good":
            assert row == Ok(value)
        else:
            assert isinstance(row, Err) and row.where == where
            assert row.record == value.decode("utf-8", "backslashreplace")  # the line, shown safely


def test_csv_quoted_newlines_bad_bytes_and_short_rows(tmp_path: Path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'p,c\n"one\ntwo",x\ncaf\xe9,y\nonly\n,empty\n')
    rows = list(read_file(path))
    assert rows[0] == (Ok({"p": "one\ntwo", "c": "x"}), f"{path}:line 2")
    assert isinstance(rows[1][0], Err) and rows[1][1] == f"{path}:line 4"
    assert rows[1][0].reason == "invalid UTF-8" and rows[1][0].record == "caf\\xe9,y"
    assert isinstance(rows[2][0], Err) and "fields" in rows[2][0].reason
    assert rows[3] == (Ok({"p": None, "c": "empty"}), f"{path}:line 6")  # empty cell: null


def test_json_document_and_its_errors(tmp_path: Path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"a": 1}, [2]]))
    (ok, _), (bad, where) = list(read_file(path))
    assert ok == Ok({"a": 1}) and isinstance(bad, Err) and where == f"{path}:row 2"
    path.write_text('[1, 2]\n{"a": 1}\n')  # JSON lines whose first row is a list
    assert [r.where for r, _ in read_file(path) if isinstance(r, Err)] == [f"{path}:line 1"]
    path.write_text('[{"a": 1},\n {"a": ]')
    with pytest.raises(DataError, match=r"a\.json:line 2: malformed JSON"):
        list(read_file(path))


def test_directories_expand_and_empty_or_missing_paths_name_the_key(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "d" / "sub" / "a.csv").write_text("a\n2\n")
    (tmp_path / "d" / ".hidden.jsonl").write_text('{"a": 3}\n')
    (tmp_path / "d" / "notes.md").write_text("x")
    assert [p.name for p in expand_files([tmp_path / "d"])] == ["b.jsonl", "a.csv"]
    assert [r.value for r, _ in read_files([tmp_path / "d"])] == [{"a": 1}, {"a": "2"}]
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"k\[1\]: .*e is a directory without data files"):
        expand_files([tmp_path / "d", tmp_path / "e"], key="k")
    with pytest.raises(DataError, match=r"k\[0\]: data file not found"):
        expand_files([tmp_path / "nope.jsonl"], key="k")
    (tmp_path / "d" / "c.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match=r"k\[0\]: .*c\.jsonl is empty"):
        expand_files([tmp_path / "d"], key="k")
