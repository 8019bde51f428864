"""SIGTERM and Ctrl-C under torchrun (2 gloo ranks on CPU), sent to the agent's whole process
group as a launcher, SLURM or a terminal does: every rank stops after the same step, the
checkpoint is written well within the agent's grace period, no ChildFailedError, and
``--resume`` under torchrun gives the uninterrupted 2-rank run's losses bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 60
YAML = """
run: {{output_dir: {out}, seed: 0, threads: 1}}
model: {{hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2,
        max_position_embeddings: 64}}
data:
  synthetic: {{num_train: 400, num_eval: 8, max_items: 5}}
  tokenizer: {{vocab_size: 300}}
  batch_size: 16
  max_length: 32
optimizer: {{lr: 0.003}}
scheduler: {{warmup_steps: 2}}
train: {{max_steps: {steps}, log_every: 1, keep_last: 0, progress: false}}
eval: {{num_samples: 4, batch_size: 4, max_new_tokens: 4, num_show: 0}}
"""
STOPPED = re.compile(r"stopped by (\w+) at step (\d+): saved to (\S+) in ([\d.]+) s")


def write_config(tmp: Path, name: str, steps: int) -> tuple[Path, Path]:
    out = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(YAML.format(out=out, steps=steps))
    return cfg, out


def step_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [x for x in path.read_text().splitlines() if x.endswith("}")]
    return [r for r in map(json.loads, lines) if "loss" in r]


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int, timeout: float = 240) -> None:
    """Until the run has logged ``n`` steps (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while len(step_rows(run)) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {n}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step {n} within {timeout} s")
        time.sleep(0.02)


def _torchrun_cmd(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [*cmd, "-m", "tscale.cli", *args]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, torchrun) -> Path:
    """The uninterrupted 2-rank run."""
    cfg, out = write_config(tmp_path_factory.mktemp("full"), "full", steps=STEPS)
    torchrun(["-m", "tscale.cli", "train", str(cfg)])
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
    cfg, out = write_config(tmp_path, "run", steps=STEPS)
    proc = subprocess.Popen(
        _torchrun_cmd("train", str(cfg)),
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

    resumed = torchrun(["-m", "tscale.cli", "train", str(cfg), "--resume"])
    assert f"resumed from {path} at step {stop}" in resumed
    assert step_rows(out) == step_rows(full)  # every step's loss, grad norm, lr: bitwise
