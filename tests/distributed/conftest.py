"""Launch real multi-process runs: ``torchrun --standalone`` with gloo on CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _torchrun_result(args: list[str], nproc: int = 2, timeout: int = 280) -> tuple[int, str]:
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS``; returns its exit status and
    output (stdout then stderr), whether or not a rank failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 280) -> str:
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS``; returns the output, fails the
    test with it when any rank fails."""
    code, out = _torchrun_result(args, nproc, timeout)
    if code != 0:
        pytest.fail(f"torchrun {' '.join(args)} failed ({code}):\n{_tail(out)}")
    return out


def _tail(out: str, chars: int = 6000) -> str:
    """The end of a failed run's output without the libraries' deprecation warnings (DeepSpeed's
    collectives print two lines per call site per rank, which pushed the cause out of view)."""
    lines = out.splitlines()
    kept = [
        line
        for i, line in enumerate(lines)
        if "FutureWarning" not in line
        and not (i > 0 and "FutureWarning" in lines[i - 1] and line.startswith("  "))
    ]
    return "\n".join(kept)[-chars:]


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


def _tscale_main(args: list[str]) -> str:
    """Run ``tscale ARGS`` in this process (``tscale.cli.main``): a one-process reference run
    without the seconds a new interpreter spends importing torch and tscale."""
    from tscale.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(args)
    out = printed.getvalue()
    if code not in (0, None):
        pytest.fail(f"tscale {' '.join(args)} exited {code}:\n{out[-6000:]}")
    return out


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(args, nproc=2) -> output``."""
    return _torchrun


@pytest.fixture(scope="session")
def torchrun_result():
    """``torchrun_result(args, nproc=2, timeout=280) -> (exit status, output)``: for runs
    expected to fail (the test reads why)."""
    return _torchrun_result


@pytest.fixture(scope="session")
def tscale_cli():
    """``tscale_cli(args) -> output`` (one process)."""
    return _tscale_cli


@pytest.fixture(scope="session")
def tscale_main():
    """``tscale_main(args) -> output``: ``tscale ARGS`` in the test's own process (no new
    interpreter; for runs without torch.distributed or DeepSpeed)."""
    return _tscale_main


TINY_YAML = """
run: {{output_dir: {out}, seed: 0, threads: 1}}
model: {{hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2}}
data:
  synthetic: {{num_train: 512, num_eval: 16}}
  batch_size: 16
  max_length: 64
optimizer: {{type: adamw, lr: 0.003, max_grad_norm: 1.0, weight_decay: 0.1}}
scheduler: {{type: cosine, warmup_steps: 2}}
train: {{max_steps: 10, log_every: 5, save_every: 5, keep_last: 0, progress: false}}
eval: {{num_samples: 8, batch_size: 8}}
log: {{plot: false}}  # curves.png: ~2 s of matplotlib per launch, checked in test_plot_cli
"""


class TinyRun:
    """The 10-step trainer run the distributed trainer tests launch, and its metrics."""

    yaml = TINY_YAML

    @staticmethod
    def config(tmp: Path, name: str) -> tuple[Path, Path]:
        """Write ``tmp/NAME.yaml`` (run directory ``tmp/NAME``); returns both paths."""
        out = tmp / name
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(TINY_YAML.format(out=out))
        return cfg, out

    @staticmethod
    def rows(run: Path) -> dict[int, dict]:
        """The step rows of ``run``'s metrics.jsonl by step."""
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}

    @classmethod
    def losses(cls, run: Path) -> dict[int, float]:
        return {step: row["loss"] for step, row in cls.rows(run).items()}


@pytest.fixture(scope="session")
def tiny_run() -> type[TinyRun]:
    return TinyRun
