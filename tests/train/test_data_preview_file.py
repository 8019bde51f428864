"""``tscale data preview FILE``: a dataset path previewed like ``tscale data inspect FILE`` takes
one, with the default config and the overrides."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tscale(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tscale.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _records(n: int = 40) -> list[dict]:
    return [
        {"prompt": f"reverse: {'a b c d'[: 1 + i % 7]}", "completion": f" x{i}"} for i in range(n)
    ]


def test_preview_a_jsonl_file(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    r = _tscale(
        "data", "preview", str(path), "data.tokenizer.vocab_size=300", "-n", "2", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("trained / not trained")
    assert lines[1].startswith("[0] <|bos|>") and lines[1].endswith("<|eos|>")
    assert lines[2].startswith("[1] ") and len(lines) == 3
    assert not (tmp_path / "runs").exists()  # a temporary run directory, gone after


def test_preview_a_csv_file_with_a_chat_template(tmp_path: Path):
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        for r in _records():
            writer.writerow({"question": r["prompt"], "answer": r["completion"]})
    r = _tscale(
        "data",
        "preview",
        str(path),
        "data.template=chatml",
        "data.column_map={prompt: question, completion: answer}",
        "data.tokenizer.vocab_size=300",
        "data.max_length=256",
        "-n",
        "1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>" in r.stdout and "reverse: a" in r.stdout


def test_preview_without_a_usable_example_says_why_in_one_line(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    r = _tscale(
        "data", "preview", str(path), "data.max_length=4", "data.length.excess=drop", cwd=tmp_path
    )
    assert r.returncode == 2, r.stdout
    assert "no example to preview; e.g. " in r.stderr and "train.jsonl" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_preview_of_a_missing_file_is_one_line(tmp_path: Path):
    r = _tscale("data", "preview", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
