"""Launch real multi-process runs: ``torchrun --standalone`` with gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 280) -> str:
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS``; returns the output, fails the
    test with it when any rank fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def _tscale_cli(args: list[str], timeout: int = 280) -> str:
    """Run ``python -m tscale.cli ARGS`` in one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tscale.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"tscale {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(args, nproc=2) -> output``."""
    return _torchrun


@pytest.fixture(scope="session")
def tscale_cli():
    """``tscale_cli(args) -> output`` (one process)."""
    return _tscale_cli
