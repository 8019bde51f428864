"""docs/quickstart.md's "Fine-tune your own model folder" walkthrough, run as written.

Every ```python and ```bash block of that section runs in order in a fresh folder holding a copy of
``configs/own_model.yaml``: Python blocks with ``exec``, each ``tscale …`` line through the CLI's
``main`` (in-process, as the ``tscale`` command would). A block that fails, or a ``tscale`` line
that exits non-zero, fails the test; then the run's files are checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tscale import cli

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Fine-tune your own model folder on your chat data"


def _blocks() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end >= 0 else None]
    return re.findall(r"```(python|bash)\n(.*?)```", body, flags=re.S)


def test_the_walkthrough_has_its_steps():
    kinds = [k for k, _ in _blocks()]
    assert kinds == ["python", "bash", "bash", "bash", "python"]


@pytest.mark.slow
def test_the_own_model_walkthrough_runs_as_written(tmp_path: Path, monkeypatch):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "own_model.yaml", tmp_path / "configs" / "own_model.yaml")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    for kind, code in _blocks():
        if kind == "python":
            printed = io.StringIO()  # what this block prints (the last one: the reply)
            with contextlib.redirect_stdout(printed):
                exec(compile(code, "docs/quickstart.md", "exec"), {"__name__": "__doc__"})
            continue
        for line in code.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            argv = shlex.split(line)
            assert argv[0] == "tscale", line
            with contextlib.redirect_stdout(io.StringIO()):
                code_ = cli.main(argv[1:])
            assert code_ in (0, None), f"{line} exited {code_}"
    run = tmp_path / "runs" / "own_model"
    report = json.loads((run / "data_report.json").read_text())
    train = report["train"]
    assert train["rows_read"] == 1500
    assert train["trained"] + train["dropped"] + train["quarantined"] == train["rows_read"]
    assert train["trained"] == 1500  # every multi-turn chat trains (assistant turns)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "step" in r and "eval/loss" not in r]
    assert losses[-1] < losses[0]
    export = run / "hf"
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (export / name).is_file(), name
    # the last block printed the model's reply to a chat turn: some text, no special tokens
    reply = printed.getvalue().strip()
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
