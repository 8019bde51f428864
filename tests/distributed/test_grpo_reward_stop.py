"""A reward over its failure limit on one rank stops every rank in the same step (2 gloo ranks).

Each rank's failure window counts the calls on its own prompts, so the ranks' windows differ;
the ranks exchange whether any window crossed after scoring, and every rank raises the same
RewardError naming the rank that crossed. Without that exchange the crossing rank stopped alone
and the other waited in the next collective until torchrun tore the group down. A run resumed
from an earlier checkpoint (each rank its own window back) stops at the same step."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tscale.testing.runs import TINY_GRPO_YAML, step_rows

# raises when a rank's prompts (2 per rank per step) are all of one task: a pure function of
# the batch, so each rank's window holds the raises of its own prompts
FLAKY = """
def flaky(prompts, completions, **kwargs):
    if len({"reverse" in p for p in prompts}) == 1:
        raise RuntimeError("flaky service")
    return [0.0] * len(completions)
"""

ARGS = [
    "train.max_steps=24",
    "train.save_every=1",
    "train.eval_every=0",
    "log.plot=false",
    "task.rewards.functions=[{fn: exact_match}, {fn: 'rank_stop_reward:flaky', name: flaky}]",
    # stop at the second raise within five calls of a rank
    "task.rewards.failure_window=5",
    "task.rewards.max_failure_fraction=0.2",
]
STOP = re.compile(
    r"tscale: error: reward 'flaky' \(task\.rewards\.functions\[1\]\) raised on 2 of its last 5 "
    r"calls on rank (\d), more than max_failure_fraction=0\.2 allows; the last: RuntimeError: "
    r"flaky service"
)
TIMING = "time/"


def _train(torchrun_result, cfg: Path, out: Path, *extra: str) -> tuple[str, float]:
    """A 2-rank run expected to stop on the reward: its output and wall time."""
    t0 = time.perf_counter()
    code, text = torchrun_result(
        ["-m", "tscale.cli", "train", str(cfg), f"run.output_dir={out}", *ARGS, *extra],
        timeout=200,
    )
    seconds = time.perf_counter() - t0
    assert code != 0, f"the run did not stop on the reward:\n{text[-3000:]}"
    return text, seconds


def _windows(run: Path, step: int) -> list[list[bool]]:
    """The flaky reward's window of each rank in ``run``'s checkpoint of ``step``."""
    meta = json.loads((run / f"checkpoints/step_{step:08d}/state.json").read_text())
    return [entry["reward_failures"]["flaky"] for entry in meta["extra"]["rollout"]]


def _saved_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture
def flaky_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``rank_stop_reward.py`` in ``tmp_path``, on the ranks' PYTHONPATH; returns the config."""
    (tmp_path / "rank_stop_reward.py").write_text(FLAKY)
    path = ":".join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(TINY_GRPO_YAML)
    return cfg


def test_every_rank_stops_at_the_step_one_rank_crosses(
    tmp_path: Path, flaky_on_path: Path, torchrun_result
) -> None:
    whole = tmp_path / "whole"
    text, seconds = _train(torchrun_result, flaky_on_path, whole)
    # (a) both ranks print the same reason, naming the rank whose window crossed; no hang
    crossed = STOP.findall(text)
    assert crossed == ["1", "1"], f"expected rank 1's crossing on both ranks:\n{text[-3000:]}"
    assert seconds < 60, f"{seconds:.0f} s: a rank waited for the other"
    rows = step_rows(whole)
    stop = rows[-1]["step"] + 1  # the rollout of this step raised
    assert [r["step"] for r in rows] == list(range(1, stop))
    # every rank took part in each save (a collective) up to the step before the stop
    assert _saved_steps(whole) == list(range(1, stop))
    # (c) one window per rank; rank 0's window stayed under the limit, rank 1's did not
    last = _windows(whole, stop - 1)
    assert len(last) == 2
    assert last[0] != last[1], "the ranks' windows should differ for this test"
    assert last[0].count(True) < last[1].count(True)

    # (b) resumed on 2 ranks from a checkpoint whose windows differ, before the step the stop
    # reads them at: each rank gets its own window back and the run stops where this one did
    at = max(s for s in range(1, stop - 1) if len(set(map(tuple, _windows(whole, s)))) == 2)
    part = tmp_path / "part"
    ckpt = whole / f"checkpoints/step_{at:08d}"
    text, _ = _train(torchrun_result, flaky_on_path, part, "--resume", str(ckpt))
    assert STOP.findall(text) == ["1", "1"], text[-3000:]
    resumed = step_rows(part)
    assert [r["step"] for r in resumed] == list(range(at + 1, stop))
    assert _without_timings(resumed) == _without_timings(rows[at:])
    for s in range(at + 1, stop):
        assert _windows(part, s) == _windows(whole, s)
