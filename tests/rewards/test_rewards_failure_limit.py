"""A crossing of the failure limit reported instead of raised (``raise_over_limit=False``), for
ranks that decide together, and the one error every rank raises from the ranks' reports."""

from __future__ import annotations

import pytest

from tscale.errors import RewardError
from tscale.rewards import FailureLimit, RewardFn, RewardSet, exact_match, failure_limit_error


def _set(raises_on: set[int]) -> tuple[RewardSet, list[int]]:
    """A flaky function (first) that raises on the calls in ``raises_on``, then exact match;
    0.2 of a window of 5 allows one raise. Returns the set and exact match's call log."""
    calls = {"flaky": 0}
    exact_calls: list[int] = []

    def flaky(prompts, completions, **_):
        calls["flaky"] += 1
        if calls["flaky"] - 1 in raises_on:
            raise TimeoutError("judge timed out")
        return [0.0] * len(completions)

    def exact(prompts, completions, completion_ids, **columns):
        exact_calls.append(len(completions))
        return exact_match(prompts, completions, completion_ids, **columns)

    functions = [
        RewardFn(name="flaky", fn=flaky, key="task.rewards.functions[0]"),
        RewardFn(name="exact", fn=exact, key="task.rewards.functions[1]"),
    ]
    return RewardSet(functions, max_failure_fraction=0.2, failure_window=5), exact_calls


BATCH = (["p", "p"], ["a", "b"], [[1], [2]], {"completion": ["a", "a"]})


def test_a_reported_crossing_scores_the_batch_and_says_what_raising_says() -> None:
    raising, _ = _set({0, 2})
    raising.score(*BATCH)
    raising.score(*BATCH)
    with pytest.raises(RewardError) as info:
        raising.score(*BATCH)

    reporting, exact_calls = _set({0, 2})
    assert reporting.score(*BATCH, raise_over_limit=False).over_limit == ()
    assert reporting.score(*BATCH, raise_over_limit=False).over_limit == ()
    scores = reporting.score(*BATCH, raise_over_limit=False)
    assert exact_calls == [2, 2, 2]  # the function after the crossing still scored
    assert scores.total.tolist() == [1.0, 0.0]
    (limit,) = scores.over_limit
    assert limit == FailureLimit(
        where="reward 'flaky' (task.rewards.functions[0])",
        raised=2,
        window=5,
        max_fraction=0.2,
        last_error="TimeoutError: judge timed out",
    )
    assert limit.message() == str(info.value)  # one process: the message it always had
    assert reporting.state_dict()["flaky"] == [True, False, True]


def test_the_ranks_error_names_the_first_crossing_in_full_and_the_others_after_it() -> None:
    a = FailureLimit(where="reward 'a'", raised=3, window=20, max_fraction=0.1, last_error="E: x")
    b = FailureLimit(where="reward 'b'", raised=5, window=20, max_fraction=0.1, last_error="E: y")
    one = str(failure_limit_error({1: [a]}))
    assert one == (
        "reward 'a' raised on 3 of its last 20 calls on rank 1, more than "
        "max_failure_fraction=0.1 allows; the last: E: x. Fix the function (or raise "
        "rewards.max_failure_fraction)"
    )
    several = str(failure_limit_error({3: [a], 1: [b, a]}))
    assert several.startswith("reward 'b' raised on 5 of its last 20 calls on rank 1,")
    assert several.endswith(
        "; over the limit too: reward 'a' on rank 1 (3 of 20), reward 'a' on rank 3 (3 of 20)"
    )
    with pytest.raises(ValueError, match="no crossing"):
        failure_limit_error({})
