"""The data report: `tscale train` accounts for every row read before training.

Run through ``tscale.cli.main`` in-process on generated JSONL files with short, long (truncated),
multi-turn (oldest turns left out), malformed (quarantined) and unfittable (dropped) rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.train.data_report import accounted, reason_key, report_lines, split_counts

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.max_position_embeddings=256",
    "data.tokenizer.vocab_size=320",
    "data.batch_size=4",
    "data.max_length=160",
    "data.template=chatml",
    "data.loss_mode=assistant_only",
    "train.max_steps=2",
    "train.log_every=1",
    "train.progress=false",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.num_show=0",
]

SENTENCE = "the quick brown fox jumps over a lazy dog while seven birds sing softly"
WORDS = SENTENCE.split(" ")


def _text(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def _chat(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": messages}


def _files(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, int]]:
    """Two training files and an eval file; the expected counts of the training rows."""
    pc = [
        {"prompt": f"add {i % 10} and {i % 7}", "completion": f"{i % 10 + i % 7}"}
        for i in range(30)
    ]
    pc += [{"prompt": _text(150, i), "completion": "yes"} for i in range(5)]  # long prompts
    pc += [{"prompt": "no answer here"}, {"prompt": "still none"}]  # completion missing
    chat = [_chat(f"say {i}", f"{i}") for i in range(20)]
    chat += [  # multi-turn, over 64 tokens: the oldest exchanges go
        _chat(*(_text(12, i + k) for k in range(8)), system="be brief") for i in range(6)
    ]
    chat += [_chat("what is up", _text(200))]  # the last assistant turn is cut
    chat.append({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]})
    chat.append(_chat("only a question"))  # nothing to train on
    chat.append(_chat("hi", "hello", system=_text(120)))  # the system prompt alone is too long
    train_pc, train_chat, held_out = (tmp_path / n for n in ("pc.jsonl", "chat.jsonl", "ev.jsonl"))
    lines = [json.dumps(r) for r in pc]
    lines.insert(7, '{"prompt": "a broken line", "completion": ')  # bad JSON
    train_pc.write_text("".join(line + "\n" for line in lines))
    train_chat.write_text("".join(json.dumps(r) + "\n" for r in chat))
    ev = [_chat(f"say {i}", f"{i}") for i in range(3)] + [_chat("hi", _text(100))]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in ev))
    expected = {
        "rows_read": len(pc) + 1 + len(chat),
        "quarantined": 5,  # bad JSON, 2 completion missing, no role, no assistant turn
        "dropped": 1,  # the system prompt alone is over data.max_length
        "truncated": 5 + 6 + 1,
    }
    return train_pc, train_chat, held_out, expected


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run:\n  output_dir: {tmp_path / 'run'}\n  device: cpu\n")
    return cfg


def test_tscale_train_prints_and_writes_the_data_report(tmp_path: Path, capsys):
    train_pc, train_chat, held_out, want = _files(tmp_path)
    cfg = _config(tmp_path)
    files = [f"data.train_files=[{train_pc},{train_chat}]", f"data.eval_files=[{held_out}]"]

    # 5 of 68 rows quarantined (7.4%) is over the default data.max_error_rate (5%): no training
    assert main(["train", str(cfg), *TINY, *files]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tscale: error: 5 of 68 training rows (7.4%) were quarantined")
    assert "data.max_error_rate" in err and "quarantine.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    assert main(["train", str(cfg), *TINY, *files, "data.max_error_rate=0.1"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text())
    train = report["train"]
    trained = want["rows_read"] - want["dropped"] - want["quarantined"]
    assert (train["rows_read"], train["trained"]) == (want["rows_read"], trained)
    assert (train["dropped"], train["quarantined"]) == (want["dropped"], want["quarantined"])
    assert train["trained"] + train["dropped"] + train["quarantined"] == train["rows_read"]
    assert train["truncated"] == want["truncated"] and train["split"] == 0
    assert train["quarantined_reasons"] == {
        "completion missing": 2,
        "invalid JSON line": 1,
        "message N has no string 'role'": 1,
        "no trained tokens": 1,
    }
    assert train["dropped_reasons"] == {"nothing trainable fits": 1}
    assert 0 < train["trained_tokens"] < train["input_tokens"]
    assert report["eval"]["rows_read"] == 4 and report["eval"]["kept"] == 4
    assert report["eval"]["truncated"] == 1
    # printed before training, in the terms of the JSON
    head = out.split("run summary")[0]
    assert f"data: 68 training rows read: {trained} trained, 1 dropped, 5 quarantined" in head
    assert f"of the trained rows: {want['truncated']} truncated to fit data.max_length" in head
    assert "dropped: nothing trainable fits (1)" in head and "dropped.jsonl" in head
    assert "quarantined (7.4%, data.max_error_rate 10.0%): completion missing (2)" in head
    assert "eval: 4 rows read: 4 kept, 0 dropped, 0 quarantined (1 truncated)" in head
    # every row once: the bad ones in the quarantine, the dropped one beside it
    quarantined = (run / "data" / "quarantine.jsonl").read_text().splitlines()
    dropped = [json.loads(x) for x in (run / "data" / "dropped.jsonl").read_text().splitlines()]
    assert len(quarantined) == 5 and len(dropped) == 1
    assert any(json.loads(q)["where"].endswith("pc.jsonl:line 8") for q in quarantined)
    assert dropped[0]["record"]["messages"][0]["role"] == "system"

    # the same report from the processed-data cache, and in the run summary
    assert main(["train", str(cfg), *TINY, *files, "data.max_error_rate=0.1", "--overwrite"]) == 0
    again = json.loads((run / "data_report.json").read_text())
    assert again["cache"] == "hit"
    assert again["train"] == train and again["eval"] == report["eval"]
    assert f"{trained} trained, 1 dropped, 5 quarantined" in capsys.readouterr().out
    assert (run / "data" / "dropped.jsonl").is_file()


def test_drop_policy_and_packing_split_counts(tmp_path: Path, capsys):
    train_pc, train_chat, held_out, want = _files(tmp_path)
    cfg = _config(tmp_path)
    base = [
        *TINY,
        f"data.train_files=[{train_pc},{train_chat}]",
        f"data.eval_files=[{held_out}]",
        "data.max_error_rate=0.1",
    ]
    assert main(["train", str(cfg), *base, "data.length.excess=drop"]) == 0
    train = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert accounted(train) and train["truncated"] == 0
    assert train["quarantined"] == want["quarantined"]
    assert train["dropped"] == want["truncated"] + want["dropped"]  # every long row dropped
    assert train["dropped_reasons"]["too long"] == want["truncated"] + want["dropped"]
    capsys.readouterr()

    split = ["data.packing.enabled=true", "data.packing.split_overflow=true", "--overwrite"]
    assert main(["train", str(cfg), *base, *split]) == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    train = report["train"]
    assert accounted(train) and train["split"] > 0 and 0 < train["fill_rate"] <= 1
    assert train["trained"] == want["rows_read"] - want["quarantined"]  # nothing cut or dropped
    assert (report["eval"]["kept"], report["eval"]["truncated"]) == (4, 1)  # eval is not packed
    assert f"{train['split']} split over several packed rows" in capsys.readouterr().out


def test_reason_keys_and_lines():
    assert reason_key("too long: 80 tokens > data.max_length 64") == "too long"
    assert reason_key("message 3 has no string 'role'") == "message N has no string 'role'"
    assert reason_key("completion missing (column 'answer')") == "completion missing"
    counts = split_counts(
        rows_read=10, kept=6, dropped={"too long": 1}, quarantined={"a": 1, "b": 2}, truncated=2
    )
    assert accounted(counts) and list(counts["quarantined_reasons"]) == ["b", "a"]
    lines = report_lines({"train": counts, "complete": False, "limit": "data.max_length"})
    assert lines[0] == (
        "data: 10 training rows read so far (streaming): 6 trained, 1 dropped, 3 quarantined"
    )
    assert "2 truncated to fit data.max_length" in lines[1]
    assert not accounted({**counts, "dropped": 2})


@pytest.mark.parametrize("rate", ["-0.1", "1.5"])
def test_max_error_rate_out_of_range_is_one_line(tmp_path: Path, capsys, rate: str):
    assert main(["train", str(_config(tmp_path)), *TINY, f"data.max_error_rate={rate}"]) == 2
    err = capsys.readouterr().err
    assert "data.max_error_rate must be in [0, 1]" in err and len(err.splitlines()) == 1


def test_streaming_report_counts_the_rows_read_so_far(tmp_path: Path):
    from tscale.config import load_config
    from tscale.train.data_build import build_data

    rows = [{"prompt": f"add {i} and 1", "completion": f"{i + 1}"} for i in range(40)]
    rows += [{"prompt": _text(150, i), "completion": "yes"} for i in range(6)]
    rows += [{"prompt": "no answer"}] * 2
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.train_files=[{train}]",
            "data.streaming=true",
            "data.tokenizer.vocab_size=300",
            "data.max_length=48",
            "data.batch_size=4",
        ],
    )
    bundle = build_data(cfg, tmp_path / "run")
    assert bundle.report["complete"] is False and bundle.report["train"]["rows_read"] == 0
    it = iter(bundle.loader)
    for _ in range(5):  # the stream is read in chunks of 256 rows: all 48 are read by now
        next(it)
    train_counts = bundle.report["train"]
    assert accounted(train_counts) and train_counts["rows_read"] == len(rows)
    assert train_counts["quarantined_reasons"] == {"completion missing": 2}
    assert train_counts["truncated"] >= 6 and train_counts["dropped"] == 0
    on_disk = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert on_disk["train"] == train_counts  # the file follows the stream
    assert report_lines(bundle.report)[0].startswith(
        f"data: {train_counts['rows_read']} training rows read so far (streaming)"
    )
