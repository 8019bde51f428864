"""``accelerate launch`` on CPU: ``--multi_gpu --num_processes 2`` runs 2 gloo ranks whose run is
bit-equal to torchrun's; ``--cpu --num_processes 2`` starts one process, and tscale says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tscale.cli import accelerate_cpu_warning

pytest.importorskip("accelerate", reason="the accelerate extra (in dev) is not installed")
pytest.importorskip("tensorboard", reason="the tensorboard extra (in dev) is not installed")

FSDP = ["parallel.dp_shard=-1", "parallel.dp_replicate=1"]  # state.json then says world_size
SHORT = ["train.max_steps=6", "train.log_every=1", "train.save_every=0", "eval.num_samples=0"]
SHORT += ["log.to=[jsonl,tensorboard]", "log.plot=false"]  # TensorBoard: rank 0 only


def _free_port() -> int:
    with socket.socket() as s:  # accelerate's default 29500 may be taken by another test run
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(args: list[str], timeout: int = 280) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_multi_gpu_on_cpu_is_two_ranks_bit_equal_to_torchrun(tmp_path: Path, torchrun, tiny_run):
    cfg, ref = tiny_run.config(tmp_path, "torchrun")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *FSDP, *SHORT])
    cfg, got = tiny_run.config(tmp_path, "accelerate")
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    flags += ["--main_process_port", str(_free_port())]
    proc = _accelerate([*flags, "-m", "tscale.cli", "train", str(cfg), *FSDP, *SHORT])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = json.loads((got / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2
    ref_rows, got_rows = _rows(ref), _rows(got)
    assert [r["step"] for r in got_rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert got_rows == ref_rows  # every loss, grad norm, lr and token count: bit-equal (JSON)
    # only rank 0 logs: one event file, holding each step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (got / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in got_rows if "loss" in r
    ]


def test_cpu_flag_runs_one_process_and_tscale_warns(tmp_path: Path, tiny_run):
    cfg, _ = tiny_run.config(tmp_path, "cpu")
    flags = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--quiet"]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    flags += ["--main_process_port", str(_free_port())]
    # an unknown key stops the run right after the warning (exit 2): no need to train
    proc = _accelerate([*flags, "-m", "tscale.cli", "train", str(cfg), "train.max_stepz=1"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("tscale: warning: `accelerate launch --cpu` started this one process") == 1
    assert out.count("unknown key 'train.max_stepz'") == 1, out[-3000:]  # one process ran


def test_the_warning_needs_accelerates_cpu_launcher_and_several_processes() -> None:
    cpu_two = {"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"}
    assert accelerate_cpu_warning(cpu_two) is not None
    assert accelerate_cpu_warning({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1
    assert accelerate_cpu_warning({**cpu_two, "WORLD_SIZE": "2"}) is None  # a real launcher
    assert accelerate_cpu_warning({"MASTER_PORT": "29500", "WORLD_SIZE": "2"}) is None
