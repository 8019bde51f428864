"""SIGTERM and SIGINT to a real ``tscale train`` process: the step finishes, a checkpoint is
saved and named, the process exits 0, and ``--resume`` gives the uninterrupted run's losses bit
for bit. A second Ctrl-C aborts at once.

The runs are processes forked by the ``fork_launcher`` fixture (``tscale.cli.main`` in a child
of a process that has imported torch and tscale): the signals reach a process of its own, with
the handlers ``tscale train`` installs, without seconds of imports per launch."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tscale.testing.runs import (
    STOPPED,
    TINY_RUN_YAML,
    step_rows,
    wait_for_rows,
    write_tiny_config,
)
from tscale.train.signals import StopSignals

STEPS = 80
NO_PLOT = "log.plot=false"  # curves.png is checked in test_plot_cli


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, fork_launcher) -> Path:
    cfg, out = write_tiny_config(tmp_path_factory.mktemp("full"), "full", STEPS)
    fork_launcher.run(["train", str(cfg), NO_PLOT], out.with_suffix(".log"))
    assert len(step_rows(out)) == STEPS
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_is_bit_identical(
    tmp_path: Path, uninterrupted: Path, sig: signal.Signals, fork_launcher
):
    cfg, out = write_tiny_config(tmp_path, "run", STEPS)
    proc = fork_launcher.start(["train", str(cfg), NO_PLOT], tmp_path / "run.log")
    wait_for_rows(proc, out, 3)
    proc.send_signal(sig)
    returncode, output = proc.wait(timeout=120), proc.output()
    assert returncode == 0, output  # a clean stop is not a failure
    assert "Traceback" not in output, output
    found = STOPPED.search(output)
    assert found, output
    name, stop, path, seconds = found[1], int(found[2]), Path(found[3]), float(found[4])
    assert name == sig.name and 3 <= stop < STEPS
    assert path == out / "checkpoints" / f"step_{stop:08d}" and (path / "state.json").is_file()
    assert json.loads((path / "state.json").read_text())["step"] == stop
    assert f"saved step {stop} to {path} in " in output
    assert seconds < 30  # well within a launcher's grace period (torchrun, SLURM: ~30 s)
    rows = step_rows(out)
    assert [r["step"] for r in rows] == list(range(1, stop + 1))  # every finished step logged
    resumed = fork_launcher.run(["train", str(cfg), "--resume", NO_PLOT], tmp_path / "resume.log")
    assert f"resumed from {path} at step {stop}" in resumed
    assert step_rows(out) == step_rows(uninterrupted)  # loss, grad norm, lr: bit for bit


def test_handlers_last_for_the_context_and_a_second_ctrl_c_aborts():
    """Real signals to this process: the first only records a request; a repeat within the
    window (torchrun forwarding the same Ctrl-C) is the same request; a later Ctrl-C raises
    KeyboardInterrupt; the previous handlers come back after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals(repeat_window_s=0.3) as signals:
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert signals.requested == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # within the window: no abort
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM never aborts
        time.sleep(0.01)
        time.sleep(0.35)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert {s: signal.getsignal(s) for s in before} == before
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.requested == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_a_real_run_at_once(tmp_path: Path, fork_launcher):
    """A model big enough (~100M params) that finishing the step and saving take seconds: a
    second SIGINT 1.2 s after the first aborts (exit 130, "interrupted", no stop checkpoint)."""
    out = tmp_path / "big"
    cfg = tmp_path / "big.yaml"
    cfg.write_text(
        TINY_RUN_YAML.format(out=out, steps=STEPS).replace(
            "{hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2,",
            "{hidden_size: 1024, intermediate_size: 2048, num_layers: 8, num_heads: 8,",
        )
    )
    proc = fork_launcher.start(["train", str(cfg)], tmp_path / "big.log")
    wait_for_rows(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.2)
    assert proc.poll() is None, "the run ended before the second Ctrl-C"
    proc.send_signal(signal.SIGINT)
    returncode, output = proc.wait(timeout=120), proc.output()
    assert returncode == 130, output
    assert "tscale: interrupted" in output and "stopped by" not in output
    ckpts = out / "checkpoints"
    assert not (ckpts.exists() and list(ckpts.glob("step_*")))  # no complete stop checkpoint
