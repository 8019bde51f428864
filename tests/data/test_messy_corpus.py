"""A corpus of messy datasets run through the CLI in-process (``main(argv)``).

Each case writes real files, runs ``tscale data inspect CFG`` (or a tiny ``tscale train``) and
checks: the exit code; no traceback; an error is one line naming the file or key; and for data
that is read, nothing is lost: rows read = trained + dropped + quarantined, the rows read are
the rows in the files, and the quarantine file holds exactly the bad rows, each with its
``file:line``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tscale.cli import main

BASE = [
    "data.template=chatml",
    "data.tokenizer.vocab_size=300",
    "data.batch_size=2",
    "data.max_length=256",
    "data.max_error_rate=0.5",
    "model.hidden_size=16",
    "model.intermediate_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.max_position_embeddings=256",
    "train.max_steps=2",
    "train.log_every=1",
    "train.progress=false",
    "eval.num_samples=0",
    "eval.num_show=0",
]


def pc(i: int) -> dict:
    return {"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"}


def alpaca(i: int) -> dict:
    return {"instruction": f"double {i}", "input": "", "output": f"{2 * i}"}


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"say {i}"},
            {"role": "assistant", "content": f"{i}"},
        ]
    }


def jl(*rows: dict | str | bytes, end: bytes = b"\n") -> bytes:
    """JSON lines: dicts dumped, strings and bytes written as they are."""
    out = b""
    for r in rows:
        if isinstance(r, dict):
            out += json.dumps(r).encode()
        elif isinstance(r, str):
            out += r.encode()
        else:
            out += r
        out += end
    return out


GOOD = [pc(i) for i in range(8)]


@dataclass
class Case:
    """A messy dataset and what tscale must do with it.

    ``bad`` are the quarantined places as ``"<file>:line N"`` (file names relative to the
    case's folder); ``rows`` the rows the files hold (None: not checked).
    """

    files: dict[str, bytes]
    overrides: list[str]
    code: int = 0
    rows: int | None = None
    bad: set[str] = field(default_factory=set)
    error: str | None = None
    command: str = "inspect"
    trained: int | None = None
    check: Callable[[str, Path], None] | None = None


def files_key(*names: str) -> str:
    return "data.train_files=[" + ",".join("{d}/" + n for n in names) + "]"


def csv_bytes() -> bytes:
    rows = ["prompt,completion", '"two\nlines",yes']
    rows += [f"q{i},a{i}" for i in range(5)]
    rows += ['"a ""quoted"" one",fine']
    return ("\n".join(rows) + "\n").encode()


CASES: dict[str, Case] = {
    "clean": Case({"a.jsonl": jl(*GOOD)}, [files_key("a.jsonl")], rows=8, trained=8),
    "invalid_utf8": Case(
        {"a.jsonl": jl(*GOOD[:2], b'{"prompt": "caf\xe9", "completion": " x"}', *GOOD[2:])},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 3"},
    ),
    "invalid_utf8_only_in_one_byte_of_many": Case(
        {"a.jsonl": jl(*GOOD, b'{"prompt": "\xff\xfe", "completion": "\xc3"}')},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 9"},
    ),
    "bom": Case(
        {"a.jsonl": b"\xef\xbb\xbf" + jl(*GOOD)}, [files_key("a.jsonl")], rows=8, trained=8
    ),
    "crlf": Case({"a.jsonl": jl(*GOOD, end=b"\r\n")}, [files_key("a.jsonl")], rows=8, trained=8),
    "bom_crlf_csv": Case(
        {
            "a.csv": b"\xef\xbb\xbfprompt,completion\r\n"
            + b"".join(f"q{i},a{i}\r\n".encode() for i in range(6))
        },
        [files_key("a.csv")],
        rows=6,
        trained=6,
    ),
    "empty_file": Case(
        {"a.jsonl": b""},
        [files_key("a.jsonl")],
        code=2,
        error=r"data\.train_files\[0\]: .*a\.jsonl is empty",
    ),
    "whitespace_only_file": Case(
        {"a.jsonl": b"\n  \n\n"},
        [files_key("a.jsonl")],
        code=2,
        error=r"data\.train_files\[0\]: .*a\.jsonl is empty",
    ),
    "only_bad_rows": Case(
        {"a.jsonl": jl("not json", "[1]", {"prompt": "p"})},
        [files_key("a.jsonl")],
        code=2,
        error=r"all 3 rows of data\.train_files \(.*a\.jsonl\) are invalid.*quarantine\.jsonl",
        bad={"a.jsonl:line 1", "a.jsonl:line 2", "a.jsonl:line 3"},
    ),
    "only_bad_rows_in_a_source": Case(
        {"a.jsonl": jl("{oops", "[1]", b"\xff")},
        ["data.sources=[{{path: {d}/a.jsonl}}]"],
        code=2,
        error=r"all 3 rows of data\.sources\[0\] \(.*a\.jsonl\) are invalid.*quarantine\.jsonl",
        bad={"a.jsonl:line 1", "a.jsonl:line 2", "a.jsonl:line 3"},
    ),
    "source_with_unknown_columns": Case(
        {"a.jsonl": jl({"foo": 1}, {"foo": 2})},
        ["data.sources=[{{path: {d}/a.jsonl}}]"],
        code=2,
        error=r"data\.sources\[0\]: .*a\.jsonl has no known columns \(columns \['foo'\]\)",
    ),
    "malformed_json_line": Case(
        {"a.jsonl": jl(*GOOD[:4], '{"prompt": "x", "completion": ', *GOOD[4:])},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 5"},
    ),
    "line_not_an_object": Case(
        {"a.jsonl": jl(*GOOD[:3], "[1, 2, 3]", '"a string"', "42", *GOOD[3:])},
        [files_key("a.jsonl")],
        rows=11,
        bad={"a.jsonl:line 4", "a.jsonl:line 5", "a.jsonl:line 6"},
    ),
    "blank_lines_keep_line_numbers": Case(
        {"a.jsonl": jl(*GOOD[:2], "", "   ", "nope", *GOOD[2:])},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 5"},
    ),
    "bad_field_values": Case(
        {"a.jsonl": jl(*GOOD, {"prompt": "p", "completion": ""}, {"prompt": 3, "completion": "c"})},
        [files_key("a.jsonl")],
        rows=10,
        bad={"a.jsonl:line 9", "a.jsonl:line 10"},
    ),
    "chat_without_answer": Case(
        {"a.jsonl": jl(*GOOD, {"messages": [{"role": "user", "content": "hi"}]})},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 9"},
    ),
    "huge_row": Case(
        {"a.jsonl": jl(*GOOD, {"prompt": "long " * 40000, "completion": " end " * 20000})},
        [files_key("a.jsonl")],
        rows=9,
        trained=9,
    ),
    "huge_row_dropped": Case(
        {"a.jsonl": jl(*GOOD, {"prompt": "p", "completion": " long" * 30000})},
        [files_key("a.jsonl"), "data.length.excess=drop"],
        check=lambda out, run: _has(out, "dropped: too long"),
        rows=9,
        trained=8,
    ),
    "duplicate_rows": Case(
        {"a.jsonl": jl(*([pc(1)] * 6), pc(2))}, [files_key("a.jsonl")], rows=7, trained=7
    ),
    "mixed_shapes_in_train_files": Case(
        {"a.jsonl": jl(*[f(i) for i in range(4) for f in (pc, alpaca, chat)])},
        [files_key("a.jsonl")],
        rows=12,
        trained=12,
        check=lambda out, run: _has(out, "mixed shapes, each row read in its own"),
    ),
    "mixed_shapes_in_a_source": Case(
        {"a.jsonl": jl(*[f(i) for i in range(4) for f in (chat, pc, alpaca)])},
        ["data.sources=[{{path: {d}/a.jsonl}}]"],
        rows=12,
        trained=12,
        check=lambda out, run: _has(out, "alpaca 4"),
    ),
    "sharegpt_and_question_answer_names": Case(
        {
            "a.jsonl": jl(
                *[{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)],
                *[
                    {
                        "conversations": [
                            {"from": "human", "value": f"h{i}"},
                            {"from": "gpt", "value": f"g{i}"},
                        ]
                    }
                    for i in range(3)
                ],
            )
        },
        [files_key("a.jsonl")],
        rows=6,
        trained=6,
    ),
    "unknown_columns_row": Case(
        {"a.jsonl": jl(*GOOD, {"foo": "bar"})},
        [files_key("a.jsonl")],
        rows=9,
        bad={"a.jsonl:line 9"},
    ),
    "csv_quoted_newlines": Case({"a.csv": csv_bytes()}, [files_key("a.csv")], rows=7, trained=7),
    "csv_bad_bytes_and_short_row": Case(
        {"a.csv": csv_bytes() + b"caf\xe9,x\nonly-one-field\n"},
        [files_key("a.csv")],
        rows=9,
        bad={"a.csv:line 10", "a.csv:line 11"},
    ),
    "json_array_with_a_non_object": Case(
        {"a.json": json.dumps([*GOOD, 5]).encode()},
        [files_key("a.json")],
        rows=9,
        bad={"a.json:row 9"},
    ),
    "json_array_malformed": Case(
        {"a.json": b'[{"prompt": "a", "completion": "b"},\n {"prompt": ]'},
        [files_key("a.json")],
        code=2,
        error=r"a\.json:line 2: malformed JSON",
    ),
    "directory_of_mixed_files": Case(
        {
            "d/a.jsonl": jl(*GOOD[:3], "oops"),
            "d/b.csv": b"question,answer\nq1,a1\nq2,a2\n",
            "d/c.json": json.dumps([alpaca(1), alpaca(2)]).encode(),
            "d/notes.md": b"# not data",
        },
        [files_key("d")],
        rows=8,
        bad={"d/a.jsonl:line 4"},
    ),
    "empty_file_in_a_directory": Case(
        {"x.jsonl": jl(*GOOD), "d/a.jsonl": jl(*GOOD), "d/b.jsonl": b""},
        ["data.train_files=[{d}/x.jsonl,{d}/d]"],
        code=2,
        error=r"data\.train_files\[1\]: .*d/b\.jsonl is empty",
    ),
    "directory_without_data": Case(
        {"d/readme.md": b"nothing"},
        [files_key("d")],
        code=2,
        error=r"data\.train_files\[0\]: .*d is a directory without data files",
    ),
    "unsupported_extension": Case(
        {"a.xlsx": b"PK"},
        [files_key("a.xlsx")],
        code=2,
        error=r"data\.train_files\[0\]: .*unsupported file type '\.xlsx'",
    ),
    "source_with_a_bad_line": Case(
        {
            "a.jsonl": jl(*GOOD[:5], "{broken", *GOOD[5:]),
            "b.jsonl": jl(*[chat(i) for i in range(4)]),
        },
        ["data.sources=[{{path: {d}/a.jsonl, weight: 2}}, {{path: {d}/b.jsonl}}]"],
        rows=13,
        bad={"a.jsonl:line 6"},
    ),
    "eval_file_with_a_bad_line": Case(
        {"a.jsonl": jl(*GOOD), "e.jsonl": jl(pc(20), b"\xff", pc(21))},
        [files_key("a.jsonl"), "data.eval_files=[{d}/e.jsonl]"],
        rows=8,
        bad={"e.jsonl:line 2"},
        check=lambda out, run: _has(out, "eval: 3 rows read: 2 kept, 0 dropped, 1 quarantined"),
    ),
    "too_many_bad_rows": Case(
        {"a.jsonl": jl(*GOOD[:4], "x", "y", "z")},
        [files_key("a.jsonl"), "data.max_error_rate=0.1"],
        code=2,
        bad={"a.jsonl:line 5", "a.jsonl:line 6", "a.jsonl:line 7"},
        error=r"3 of 7 training rows .* data\.max_error_rate 0\.1.*quarantine\.jsonl",
    ),
    "error_budget_off": Case(
        {"a.jsonl": jl(*GOOD[:4], "x", "y", "z", "w")},
        [files_key("a.jsonl"), "data.max_error_rate=null"],
        rows=8,
        bad={f"a.jsonl:line {n}" for n in (5, 6, 7, 8)},
    ),
    "train_with_bad_lines": Case(
        {"a.jsonl": jl(*GOOD, b"\xfe{", "[]", *GOOD)},
        [files_key("a.jsonl")],
        command="train",
        rows=18,
        bad={"a.jsonl:line 9", "a.jsonl:line 10"},
    ),
    "train_mixed_shapes": Case(
        {"a.jsonl": jl(*[f(i) for i in range(4) for f in (pc, alpaca, chat)])},
        [files_key("a.jsonl")],
        command="train",
        rows=12,
        trained=12,
    ),
    "streaming_source_with_only_bad_rows": Case(
        {"a.jsonl": jl("{bad", "[]", b"\xff")},
        [files_key("a.jsonl"), "data.streaming=true"],
        command="train",
        code=2,
        error=r"all 3 rows of data\.train_files \(.*a\.jsonl\).*quarantine\.jsonl",
        bad={"a.jsonl:line 1", "a.jsonl:line 2", "a.jsonl:line 3"},
    ),
    "inspect_a_path_with_bad_lines": Case(
        {"a.jsonl": jl(*GOOD[:2], "{oops", *GOOD[2:])},
        ["{d}/a.jsonl"],
        command="path",
        check=lambda out, run: _has(out, "bad rows (train): 1, first"),
    ),
    "inspect_a_directory_of_mixed_files": Case(
        {"d/a.jsonl": jl(*GOOD[:3]), "d/b.csv": b"prompt,completion\nq,a\n"},
        ["{d}/d"],
        command="path",
        check=lambda out, run: _has(out, "train: 4 rows"),
    ),
    "inspect_a_path_with_only_bad_rows": Case(
        {"a.jsonl": jl("x", "y")},
        ["{d}/a.jsonl"],
        command="path",
        code=2,
        error=r"a\.jsonl: none of its 2 rows .*a\.jsonl:line 1: invalid JSON line",
    ),
    "streaming_nothing_trainable": Case(
        {
            "a.jsonl": jl(
                *[{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(5)]
            )
        },
        [files_key("a.jsonl"), "data.streaming=true"],
        command="train",
        code=2,
        error=r"epoch 0 .* no usable training example \(5 rows read\); .*quarantine\.jsonl",
        bad={f"a.jsonl:line {n}" for n in range(1, 6)},
    ),
    "streaming_with_a_bad_line": Case(
        {"a.jsonl": jl(*GOOD, "{bad", *GOOD)},
        [files_key("a.jsonl"), "data.streaming=true"],
        command="train",
        bad={"a.jsonl:line 9"},
    ),
}


def _has(out: str, text: str) -> None:
    assert text in out, out


_COUNTS = re.compile(
    r"data: (\d+) training rows read: (\d+) trained, (\d+) dropped, (\d+) quarantined"
)


def _place(where: str, root: Path) -> str:
    path, _, pos = where.rpartition(":")
    return f"{Path(path).relative_to(root).as_posix()}:{pos}"


@pytest.mark.parametrize("name", list(CASES))
def test_messy_dataset(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    d = tmp_path / "in"
    for rel, content in case.files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content)
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  output_dir: {run}\n")
    overrides = [*BASE, *(o.format(d=d) for o in case.overrides)]
    if case.command == "path":  # `tscale data inspect PATH`: no config, no run
        argv = ["data", "inspect", case.overrides[0].format(d=d)]
    elif case.command == "inspect":
        argv = ["data", "inspect", str(cfg), *overrides]
    else:
        argv = ["train", str(cfg), *overrides]
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, err or out
    if case.code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tscale: error: "), err
        assert case.error is not None and re.search(case.error, lines[0]), lines[0]
    quarantine = run / "data" / "quarantine.jsonl"
    q = [json.loads(x) for x in quarantine.read_text().splitlines()] if quarantine.exists() else []
    assert {_place(r["where"], d) for r in q if "eval record" not in r["where"]} == case.bad
    for r in q:  # the bad row itself is kept (the raw line for one that does not parse)
        assert r["reason"] and r["record"] not in (None, "")
    if case.code or case.command == "path":
        if case.check is not None:
            case.check(out, run)
        return
    if case.command == "train":
        counts = json.loads((run / "data_report.json").read_text())["train"]
        rows, trained = counts["rows_read"], counts["trained"]
        dropped, quarantined = counts["dropped"], counts["quarantined"]
    else:
        m = _COUNTS.search(out)
        assert m, out
        rows, trained, dropped, quarantined = map(int, m.groups())
    assert rows == trained + dropped + quarantined
    if case.rows is not None:
        assert rows == case.rows
        assert quarantined == len(case.bad - {b for b in case.bad if b.startswith("e.")})
    if case.trained is not None:
        assert trained == case.trained
    if case.check is not None:
        case.check(out, run)


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25
