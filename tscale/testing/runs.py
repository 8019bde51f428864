"""Drive real ``tscale train`` processes in tests: a tiny config, its logged steps, waiting.

Used by tests that signal or kill a run mid-way (one process or under torchrun) and compare it
with an uninterrupted one; useful for testing your own configs and callbacks the same way.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

TINY_RUN_YAML = """
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
"""A tiny synthetic run (seconds on a CPU) that logs every step; ``{out}`` and ``{steps}``."""

TINY_GRPO_YAML = """
run: {seed: 0, threads: 1}
model: {hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 2,
        max_position_embeddings: 64}
data:
  synthetic: {tasks: [reverse, sort], num_train: 64, num_eval: 8, min_items: 3, max_items: 4}
  tokenizer: {vocab_size: 300}
  max_length: 48
  batch_size: 4
optimizer: {type: adamw, lr: 0.003}
scheduler: {warmup_steps: 0}
train: {log_every: 1, progress: false, keep_last: 0}
eval: {num_samples: 4, batch_size: 4, max_new_tokens: 8, num_show: 0}
task:
  type: grpo
  num_generations: 4
  max_completion_length: 8
  # a random model never answers right: a reward with spread gives the loss something to do
  rewards:
    functions:
      - {fn: exact_match}
      - {fn: format_match, kwargs: {pattern: '[a-h]', mode: search}, name: has_letter}
"""
"""A tiny GRPO run (random init, synthetic prompts, 4 prompts x 4 completions per step) with a
reward that has spread even for a random model; set run.output_dir and train.max_steps."""

STOPPED = re.compile(r"stopped by (\w+) at step (\d+): saved to (\S+) in ([\d.]+) s")
"""The line a run stopped by a signal prints: signal name, step, checkpoint path, seconds."""


def write_tiny_config(tmp: Path, name: str, steps: int) -> tuple[Path, Path]:
    """``tmp/name.yaml`` of :data:`TINY_RUN_YAML` running ``steps`` steps into ``tmp/name``;
    returns ``(config, run directory)``."""
    out = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(TINY_RUN_YAML.format(out=out, steps=steps))
    return cfg, out


def step_rows(run: Path) -> list[dict]:
    """The training rows of ``run/metrics.jsonl`` logged so far (a line being written is left
    out)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [x for x in path.read_text().splitlines() if x.endswith("}")]
    return [r for r in map(json.loads, lines) if "loss" in r]


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int, timeout: float = 240) -> None:
    """Wait until ``run`` has logged ``n`` steps.

    Raises:
        AssertionError: the process ended first, or ``timeout`` seconds passed (then it is
            killed).
    """
    deadline = time.monotonic() + timeout
    while len(step_rows(run)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {n}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {n} within {timeout} s")
        time.sleep(0.02)


__all__ = [
    "STOPPED",
    "TINY_GRPO_YAML",
    "TINY_RUN_YAML",
    "step_rows",
    "wait_for_rows",
    "write_tiny_config",
]

TINY_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=64",
    "data.tokenizer.vocab_size=300",
]
"""Overrides for a tiny random-init model (and its BPE): train in seconds on a CPU."""

TINY_DATA = [
    "data.synthetic.num_train=200",
    "data.synthetic.num_eval=8",
    "data.synthetic.max_items=5",
    "data.batch_size=16",
    "data.max_length=32",
]
"""Overrides for a small synthetic task that fits :data:`TINY_MODEL`."""

TINY_QUICKSTART = [
    *TINY_MODEL,
    "model.num_kv_heads=1",
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=8",
    "data.batch_size=8",
    "train.max_steps=3",
    "scheduler.warmup_steps=1",
    "train.progress=false",
    "run.threads=1",
    "eval.num_samples=4",
    "eval.max_new_tokens=8",
]
"""Overrides that shrink ``configs/quickstart.yaml`` to a 3-step run of a tiny model: the base
folder the RL and LoRA config tests export and start from."""
