"""The progress line: epoch (runs sized by train.epochs), step, loss, lr, tokens/s, ETA and the
task's own metrics, as plain lines off a terminal and in the rich bar on one."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from tscale.config import load_config
from tscale.train import train
from tscale.train.callbacks import ProgressBar

ROW = {
    "step": 5,
    "loss": 1.234567,
    "grad_norm": 0.5,
    "lr": 1e-3,
    "tokens": 100,
    "input_tokens": 200,
    "rewards/accuracy": 0.75,
    "kl": 0.0123456,
}


def _feed(bar: ProgressBar) -> None:
    bar.on_train_start({"step": 0, "max_steps": 20})
    bar.on_step_end({"rows": [ROW], "tokens_per_s": 1234.5, "max_steps": 20})
    bar.on_train_end({"step": 5, "summary": {}})


def test_plain_line_has_epoch_step_loss_lr_speed_task_metrics_and_eta() -> None:
    out = io.StringIO()
    _feed(ProgressBar(Console(file=out, width=300), steps_per_epoch=10, epochs=2))
    line = out.getvalue().strip()
    assert re.fullmatch(
        r"epoch 0\.50/2  step 5/20  loss 1\.2346  lr 1\.00e-03  1,234 tok/s  "
        r"rewards/accuracy 0\.75  kl 0\.01235  ETA \d\d:\d\d:\d\d",
        line,
    ), line


def test_without_epochs_or_task_metrics_the_line_is_as_before() -> None:
    out = io.StringIO()
    row = {k: v for k, v in ROW.items() if k not in ("rewards/accuracy", "kl")}
    bar = ProgressBar(Console(file=out, width=300))
    bar.on_train_start({"step": 0, "max_steps": 20})
    bar.on_step_end({"rows": [row], "tokens_per_s": 99.0, "max_steps": 20})
    assert re.fullmatch(
        r"step 5/20  loss 1\.2346  lr 1\.00e-03  99 tok/s  ETA \d\d:\d\d:\d\d",
        out.getvalue().strip(),
    )


def test_chosen_key_metrics_and_the_rich_bar_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=True, color_system=None)
    _feed(ProgressBar(console, steps_per_epoch=10, epochs=2, key_metrics=["kl"]))
    shown = out.getvalue()
    assert "train epoch 0.50/2" in shown and "5/20" in shown and "loss 1.2346" in shown
    assert "kl 0.01235" in shown and "rewards/accuracy" not in shown
    assert "ETA" in shown and "1,234 tok/s" in shown


def test_a_run_sized_by_epochs_shows_its_epoch(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.num_layers=2",
            "model.num_heads=2",
            "data.synthetic.num_train=64",
            "data.synthetic.num_eval=4",
            "data.batch_size=16",
            "data.max_length=32",
            "data.tokenizer.vocab_size=300",
            "train.epochs=2",
            "train.log_every=2",
            "train.progress=false",
            "eval.num_samples=0",
            "log.plot=false",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    out = io.StringIO()
    train(cfg, console=Console(file=out, width=300))
    lines = [x for x in out.getvalue().splitlines() if "tok/s" in x]
    assert lines[0].startswith("epoch 0.50/2  step 2/8  loss "), lines  # 4 steps per epoch
    assert lines[-1].startswith("epoch 2.00/2  step 8/8  loss "), lines


def test_the_eval_line_shows_the_tasks_key_metrics_it_has() -> None:
    out = io.StringIO()
    bar = ProgressBar(
        Console(file=out, width=300), key_metrics=["rewards/accuracies", "rewards/margins"]
    )
    ev = {"loss": 0.61234, "rewards/accuracies": 0.96, "exact_match": 0.475, "kl": 0.0}
    bar.on_eval({"step": 200, "eval": ev})
    assert out.getvalue().strip() == (
        "eval @ step 200: loss 0.6123  exact-match 47.5%  rewards/accuracies 0.96"
    )
