"""The rewards' failure window travels in the checkpoint: a GRPO run resumed from any step keeps
the window of the uninterrupted run and stops (RewardError) at the step that run stops at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tscale.config import load_config
from tscale.errors import CheckpointError, RewardError
from tscale.rewards import RewardFn, RewardSet
from tscale.testing.runs import TINY_GRPO_YAML, step_rows
from tscale.train.trainer import train

# raises on the batches with 3 or more reverse prompts: a pure function of the batch, so of the
# data cursor, never of how many calls this process made
FLAKY = """
def flaky(prompts, completions, **kwargs):
    if sum("reverse" in p for p in set(prompts)) >= 3:
        raise RuntimeError("flaky service")
    return [0.0] * len(completions)
"""

REWARDS = (
    "task.rewards.functions=[{fn: exact_match}, {fn: 'grpo_window_reward:flaky', name: flaky}]"
)
MAX_STEPS = 24


def _run(tmp: Path, name: str, *, resume: bool) -> None:
    yaml = tmp / "grpo.yaml"
    yaml.write_text(TINY_GRPO_YAML)
    cfg = load_config(
        str(yaml),
        [
            f"run.output_dir={tmp / name}",
            f"train.max_steps={MAX_STEPS}",
            "train.save_every=1",
            "train.eval_every=0",
            "log.plot=false",
            REWARDS,
            # stop at the second raise within five calls
            "task.rewards.failure_window=5",
            "task.rewards.max_failure_fraction=0.2",
        ],
    )
    with pytest.raises(RewardError, match=r"'flaky'.* raised on 2 of its last 5 calls"):
        train(cfg, resume=resume)


def _window(run: Path, step: int) -> list[bool]:
    meta = json.loads((run / f"checkpoints/step_{step:08d}/state.json").read_text())
    (rank0,) = meta["extra"]["rollout"]
    return rank0["reward_failures"]["flaky"]


def test_resumed_run_keeps_the_window_and_stops_at_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "grpo_window_reward.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    _run(tmp_path, "whole", resume=False)
    whole = step_rows(tmp_path / "whole")
    stop = whole[-1]["step"] + 1  # the rollout of this step raised
    # resume from the last checkpoint whose window holds a raise but is not the step before the
    # stop, so that the resumed run saves windows of its own before it stops
    at = max(s for s in range(1, stop - 1) if any(_window(tmp_path / "whole", s)))
    assert at < stop - 1, "the flaky reward raised too seldom for this test"
    assert _window(tmp_path / "whole", at).count(True) == 1
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    name = f"step_{at:08d}"
    shutil.copytree(tmp_path / "whole/checkpoints" / name, part / name)
    _run(tmp_path, "part", resume=True)  # a fresh window here would not stop at `stop`
    resumed = step_rows(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(at + 1, stop))
    for s in range(at + 1, stop):
        assert _window(tmp_path / "part", s) == _window(tmp_path / "whole", s)


def _set(window: int = 3) -> RewardSet:
    return RewardSet(
        [RewardFn(name="a", fn=lambda completions, **_: [1.0] * len(completions))],
        failure_window=window,
    )


def test_state_dict_round_trips_and_refuses_other_functions() -> None:
    rewards = _set()
    rewards.load_state_dict({"a": [True, False, True, False]})  # the newest 3 kept
    assert rewards.state_dict() == {"a": [False, True, False]}
    rewards.score(["p"], ["c"], [[1]])
    assert rewards.state_dict() == {"a": [True, False, False]}
    with pytest.raises(CheckpointError, match=r"functions \['b'\], this run's are \['a'\]"):
        rewards.load_state_dict({"b": []})
