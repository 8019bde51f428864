"""SIGTERM and Ctrl-C under torchrun (2 gloo ranks on CPU), sent to the agent's whole process
group as a launcher, SLURM or a terminal does: every rank stops after the same step, the
checkpoint is written well within the agent's grace period, no ChildFailedError, and
``--resume`` under torchrun gives the uninterrupted 2-rank run's losses bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tscale.testing.runs import (
    STOPPED,
    step_rows,
    wait_for_rows,
    write_tiny_config,
)

STEPS = 60
NO_PLOT = "log.plot=false"  # curves.png is checked in test_plot_cli


def _torchrun_cmd(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [*cmd, "-m", "tscale.cli", *args]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, torchrun) -> Path:
    """The uninterrupted 2-rank run."""
    cfg, out = write_tiny_config(tmp_path_factory.mktemp("full"), "full", steps=STEPS)
    torchrun(["-m", "tscale.cli", "train", str(cfg), NO_PLOT])
    assert len(step_rows(out)) == STEPS
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "sig"),
    [("group", signal.SIGTERM), ("workers", signal.SIGTERM), ("group", signal.SIGINT)],
)
def test_signal_under_torchrun_saves_and_resumes_bit_identically(
    tmp_path: Path, torchrun, full: Path, target: str, sig: signal.Signals
):
    """``group``: the signal to the agent's process group (agent and workers, as SLURM or a
    Ctrl-C in the terminal does; the agent forwards it once more, and that repeat must not
    abort). ``workers``: SIGTERM to the workers only (what the agent sends), after which
    torchrun itself must report success."""
    cfg, out = write_tiny_config(tmp_path, "run", steps=STEPS)
    proc = subprocess.Popen(
        _torchrun_cmd("train", str(cfg), NO_PLOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, as under a launcher
    )
    try:
        wait_for_rows(proc, out, 3)
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert len(children) == 2, children
            for pid in children:
                os.kill(int(pid), sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "ChildFailedError" not in output, output
    if target == "workers":
        assert proc.returncode == 0, output  # both workers exited 0: torchrun succeeded
        assert "Traceback" not in output, output
    else:  # torchrun, signalled itself, re-raises the signal as SignalException (exit 1)
        assert "Traceback" not in output.split("run summary")[0], output  # none from tscale
    found = STOPPED.search(output)
    assert found, output
    stop, path, seconds = int(found[2]), Path(found[3]), float(found[4])
    assert found[1] == sig.name and 3 <= stop < STEPS
    assert (path / "state.json").is_file() and path.name == f"step_{stop:08d}"
    assert seconds < 30  # torchrun's agent sends SIGKILL 30 s after forwarding SIGTERM
    assert [r["step"] for r in step_rows(out)] == list(range(1, stop + 1))

    resumed = torchrun(["-m", "tscale.cli", "train", str(cfg), "--resume", NO_PLOT])
    assert f"resumed from {path} at step {stop}" in resumed
    assert step_rows(out) == step_rows(full)  # every step's loss, grad norm, lr: bitwise
