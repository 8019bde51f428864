"""``tscale runs``: the runs under a folder with their last step, loss and eval figures."""

from __future__ import annotations

import json
from pathlib import Path

from tscale import cli
from tscale.train.runs_cli import list_runs

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.max_position_embeddings=64",
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=8",
    "data.tokenizer.vocab_size=300",
    "data.batch_size=16",
    "data.max_length=32",
    "scheduler.warmup_steps=1",
    "train.max_steps=3",
    "train.progress=false",
    "eval.num_samples=4",
    "eval.max_new_tokens=4",
    "eval.num_show=0",
]


def test_runs_lists_each_run_with_its_last_figures(tmp_path: Path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("# keys on the command line\n")
    for name, lr in (("adamw-1e-3", "1e-3"), ("adamw-3e-3", "3e-3")):
        out = f"run.output_dir={tmp_path / 'runs' / name}"
        assert cli.main(["train", str(config), *TINY, out, f"optimizer.lr={lr}"]) == 0
    (tmp_path / "runs" / "notes").mkdir()  # not a run: left out
    capsys.readouterr()

    runs = list_runs(tmp_path / "runs")
    assert [r["run"] for r in runs] == ["adamw-1e-3", "adamw-3e-3"]
    for r in runs:
        rows = [json.loads(x) for x in (tmp_path / "runs" / r["run"] / "metrics.jsonl").open()]
        last = [x for x in rows if "loss" in x][-1]
        assert (r["step"], r["loss"]) == (3, last["loss"])
        assert r["eval"]["loss"] == [x for x in rows if "eval/loss" in x][-1]["eval/loss"]
        assert r["checkpoint"] == "step_00000003"
    assert list_runs(tmp_path / "runs" / "adamw-1e-3")[0]["run"] == "adamw-1e-3"  # a run itself

    assert cli.main(["runs", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out
    assert "adamw-1e-3" in printed and "adamw-3e-3" in printed and "step_00000003" in printed
    assert cli.main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
