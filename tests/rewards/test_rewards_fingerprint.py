"""Fingerprints of the rewards: stable for the same deterministic rewards, different when a
function's behaviour or weight changes, an error for a nondeterministic function."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from tscale.data.synthetic import generate
from tscale.errors import CheckpointError, RewardError
from tscale.rewards import (
    RewardConfig,
    RewardFn,
    RewardsConfig,
    RewardSet,
    build_reward_set,
    check_fingerprint,
    compare_fingerprints,
    fingerprint_rewards,
    make_probe,
)

RECORDS = generate(["reverse", "sort", "add"], 12, seed=11, min_items=2, max_items=5)
PROBE = make_probe(RECORDS)
LENGTH_REWARD = """
LIMIT = {limit}

def brevity(prompts, completions, completion_ids, **columns):
    return [1.0 if len(ids) <= LIMIT else 0.0 for ids in completion_ids]
"""


def _user_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, name: str) -> RewardSet:
    """A set with exact match and a user's function from a module file (a fresh module name,
    as a resumed process imports the file anew)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(LENGTH_REWARD.format(limit=limit)))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardsConfig(
        functions=[RewardConfig(), RewardConfig(fn=f"{name}:brevity", name="brevity")]
    )
    return build_reward_set(cfg)


def test_the_probe_holds_each_records_answer_so_exact_match_scores_both_ways() -> None:
    assert len(set(PROBE.prompts)) == len({r["prompt"] for r in RECORDS[:8]})
    rs = build_reward_set(RewardsConfig())
    scores = rs.score(
        list(PROBE.prompts),
        list(PROBE.completions),
        [list(i) for i in PROBE.completion_ids],
        {k: list(v) for k, v in PROBE.columns.items()},
    )
    hits = scores.per_function[:, 0].tolist()
    assert hits.count(1.0) == 2 * 8  # each answer, and each answer padded with spaces
    assert hits.count(0.0) == len(hits) - 16
    assert make_probe(RECORDS) == PROBE  # a pure function of the records


def test_the_same_rewards_give_the_same_fingerprint_in_a_new_process_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fingerprint_rewards(_user_set(tmp_path, monkeypatch, 6, "rw_a"), PROBE)
    again = fingerprint_rewards(_user_set(tmp_path, monkeypatch, 6, "rw_b"), PROBE)
    assert first == again and set(first) == {"exact_match", "brevity"}
    check_fingerprint(first, again)  # no error
    assert compare_fingerprints(first, again) == []


def test_a_function_that_behaves_differently_changes_its_fingerprint_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = fingerprint_rewards(_user_set(tmp_path, monkeypatch, 6, "rw_c"), PROBE)
    now = fingerprint_rewards(_user_set(tmp_path, monkeypatch, 9, "rw_d"), PROBE)
    assert saved["exact_match"] == now["exact_match"]
    assert saved["brevity"] != now["brevity"]
    with pytest.raises(
        CheckpointError,
        match=r"^the reward functions changed since the checkpoint was written: 'brevity' "
        r"scores the probe differently or has another weight\. ",
    ):
        check_fingerprint(saved, now)


def test_a_changed_weight_an_added_and_a_removed_function_are_named() -> None:
    one = RewardSet([RewardFn(name="exact_match", fn=_exact(), weight=1.0)])
    heavier = RewardSet([RewardFn(name="exact_match", fn=_exact(), weight=2.0)])
    assert fingerprint_rewards(one, PROBE) != fingerprint_rewards(heavier, PROBE)
    other = RewardSet([RewardFn(name="em", fn=_exact())])
    problems = compare_fingerprints(
        fingerprint_rewards(one, PROBE), fingerprint_rewards(other, PROBE)
    )
    assert problems == ["'em' is new", "'exact_match' is gone"]


def _exact():
    from tscale.rewards import exact_match

    return exact_match


def test_a_nondeterministic_function_is_an_error_naming_it() -> None:
    rng = random.Random(0)

    def noisy(prompts, completions, completion_ids, **columns):
        return [rng.random() for _ in completions]

    rs = RewardSet([RewardFn(name="noisy", fn=noisy, key="task.rewards.functions[0]")])
    with pytest.raises(
        RewardError,
        match=r"^reward 'noisy' \(task.rewards.functions\[0\]\) is not deterministic: two calls "
        r"on the same probe gave 0\.\d+ then 0\.\d+ for completion 0 ",
    ):
        fingerprint_rewards(rs, PROBE)


def test_a_function_that_raises_on_the_probe_is_fingerprinted_without_counting() -> None:
    def broken(prompts, completions, completion_ids, **columns):
        raise ValueError(f"object at {id(completions):#x}")  # an address: not hashed

    rs = RewardSet([RewardFn(name="broken", fn=broken)], max_failure_fraction=0.0)
    a = fingerprint_rewards(rs, PROBE)
    b = fingerprint_rewards(rs, PROBE)  # the window saw nothing: no RewardError
    assert a == b
