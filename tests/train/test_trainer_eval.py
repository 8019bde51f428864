"""Evaluation that fits the data: every combination of held-out data (eval files, train files
only, the synthetic task) and generation (eval.num_samples 0 or more) finishes, saves its final
checkpoint, and reports what the data allows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from tscale.config import load_config
from tscale.data import synthetic
from tscale.testing.runs import TINY_MODEL
from tscale.train import train
from tscale.train.trainer import reference_answer

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

STEPS = 6
TINY = [
    *TINY_MODEL,
    "data.synthetic.num_train=96",
    "data.synthetic.num_eval=12",
    "data.synthetic.max_items=5",
    "data.batch_size=16",
    "data.max_length=32",
    "optimizer.lr=3e-3",
    f"train.max_steps={STEPS}",
    "train.log_every=2",
    "train.eval_every=3",
    "train.progress=false",
    "eval.batch_size=8",
    "eval.max_new_tokens=6",
    "run.threads=1",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prompt/completion train and eval JSONL files on disk (the synthetic task's records)."""
    root = tmp_path_factory.mktemp("files")
    train_records, eval_records = synthetic.make_splits(
        ["reverse", "sort"], 96, 12, seed=1, min_items=3, max_items=5
    )
    return {
        "train": synthetic.write_jsonl(train_records, root / "train.jsonl"),
        "eval": synthetic.write_jsonl(eval_records, root / "eval.jsonl"),
    }


def _run(tmp_path: Path, data: str, files: dict[str, Path], *extra: str) -> tuple[dict, str]:
    overrides = [*TINY, f"run.output_dir={tmp_path / 'run'}", NO_PLOT, *extra]
    if data in ("eval_files", "train_files"):
        overrides.append(f"data.train_files=[{files['train']}]")
    if data == "eval_files":
        overrides.append(f"data.eval_files=[{files['eval']}]")
    console = Console(record=True, width=200)
    result = train(load_config(None, overrides), console=console)
    return result.summary, console.export_text()


def _eval_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.startswith("eval/") for k in r)]


@pytest.mark.parametrize("num_samples", [0, 4])
@pytest.mark.parametrize("data", ["eval_files", "train_files", "synthetic"])
def test_every_combination_finishes_and_reports_what_the_data_allows(
    tmp_path: Path, files: dict[str, Path], data: str, num_samples: int
):
    summary, out = _run(tmp_path, data, files, f"eval.num_samples={num_samples}")
    run = tmp_path / "run"
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "state.json").is_file()
    assert summary["final_step"] == STEPS
    rows = _eval_rows(run)
    if data == "train_files":  # nothing held out: no eval, one line that says so
        assert summary["eval"] == {} and rows == []
        assert "no held-out data (data.eval_files is empty)" in out
        return
    assert "no held-out data" not in out
    assert [r["step"] for r in rows] == [3, STEPS]  # eval_every 3, and at the end
    for row in rows:
        assert row["eval/perplexity"] == pytest.approx(math.exp(row["eval/loss"]), rel=1e-12)
    ev = summary["eval"]
    assert set(ev) >= {"loss", "perplexity"}
    if num_samples:
        assert 0.0 <= ev["exact_match"] <= 1.0
        assert {"exact_match/reverse", "exact_match/sort"} <= set(ev)
    else:
        assert not any(k.startswith("exact_match") for k in ev)
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())
    assert meta["extra"]["eval"] == ev  # the last eval travels with the checkpoint


def test_lora_run_without_eval_files_writes_its_adapter(tmp_path: Path, files: dict[str, Path]):
    """The bug of issue 12: the run crashed after its last step, before the final checkpoint
    and the adapter directory."""
    summary, _ = _run(tmp_path, "train_files", files, "lora.enabled=true", "lora.rank=4")
    assert summary["final_step"] == STEPS
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def test_exact_match_only_for_records_with_a_reference(tmp_path: Path, files: dict[str, Path]):
    """Chat records whose last turn is the user's have no answer to compare with: they count in
    the held-out loss but are not generated for; records with an answer are."""
    eval_file = tmp_path / "chat.jsonl"
    records = [json.loads(x) for x in files["eval"].read_text().splitlines()]

    def chat(r: dict) -> list[dict]:
        return [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]

    answered = [{"messages": chat(r)} for r in records[:3]]
    unanswered = [
        {"messages": [*chat(r), {"role": "user", "content": "thanks"}]} for r in records[3:]
    ]
    synthetic.write_jsonl([*unanswered, *answered], eval_file)
    overrides = [
        f"data.train_files=[{files['train']}]",
        f"data.eval_files=[{eval_file}]",
        "data.loss_mode=assistant_only",
        "data.template=chatml",  # chat data needs a chat template
        "data.max_length=128",  # chatml markers are not single tokens of this tiny BPE
        "model.max_position_embeddings=128",
        "eval.num_samples=100",
        "eval.num_show=10",
    ]
    console = Console(record=True, width=200)
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path / 'run'}", *overrides])
    result = train(cfg, console=console)
    ev = result.summary["eval"]
    assert {"loss", "perplexity", "exact_match"} <= set(ev)
    assert result.summary["data"]["eval_examples"] == len(records)  # all in the loss
    out = console.export_text()
    shown = [line for line in out.splitlines() if "(expected " in line]
    assert len(shown) == len(answered)  # generated for the answered records only
    for r in answered:  # the prompt as the model got it: through the chat template
        question = r["messages"][0]["content"]
        assert any(f"<|im_start|>user\\n{question}<|im_end|>" in line for line in shown), shown


def test_only_eval_records_with_an_answer_have_a_reference():
    assert reference_answer({"prompt": "q", "completion": " a"}) == " a"
    assert reference_answer({"instruction": "i", "input": "", "output": "o"}) == "o"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert reference_answer({"messages": chat}) == "a"
    assert reference_answer({"messages": [*chat, {"role": "user", "content": "more"}]}) is None
    share = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert reference_answer({"conversations": share}) == "a"
    assert reference_answer({"text": "plain text, nothing to answer"}) is None
    # a file mixing formats gives every record every column, None where it has none
    assert reference_answer({"prompt": None, "completion": None, "messages": share[:1]}) is None
