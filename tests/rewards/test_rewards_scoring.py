"""RewardSet.score: the weighted combination with None, per-function statistics, failures of a
function that raises (None, counted, logged, a threshold error) and outputs that break the
contract."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.utils import nanstd

from tscale.data.synthetic import generate
from tscale.errors import RewardError, ShapeError
from tscale.rewards import (
    RewardConfig,
    RewardFn,
    RewardsConfig,
    RewardSet,
    build_reward_set,
    exact_match,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
RECORDS = generate(["reverse", "sort", "add"], 24, seed=5, min_items=2, max_items=4)


def _batch(completions: Sequence[str] | None = None) -> tuple[list, list, list, dict]:
    answers = [r["completion"] for r in RECORDS]
    completions = list(completions if completions is not None else answers)
    columns = {"completion": answers, "task": [r["task"] for r in RECORDS]}
    ids = [list(range(len(c.split()))) for c in completions]
    return [r["prompt"] for r in RECORDS], completions, ids, columns


def _const(values: Sequence[float | None]):
    def fn(prompts, completions, completion_ids, **columns):
        return list(values)

    return fn


values_st = st.lists(
    st.one_of(st.none(), st.floats(-100, 100, allow_nan=False, width=32)), min_size=6, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(
    columns=st.lists(values_st, min_size=1, max_size=4),
    weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=4, max_size=4),
)
def test_total_is_the_weighted_sum_over_the_functions_that_scored(
    columns: list[list[float | None]], weights: list[float]
) -> None:
    fns = [
        RewardFn(name=f"f{i}", fn=_const(col), weight=w)
        for i, (col, w) in enumerate(zip(columns, weights, strict=False))
    ]
    texts = [""] * 6
    scores = RewardSet(fns).score(texts, texts, [[]] * 6)
    for row in range(6):
        scored = [(col[row], f.weight) for col, f in zip(columns, fns, strict=False)]
        scored = [(v, w) for v, w in scored if v is not None]
        got = float(scores.total[row])
        if not scored:  # unscorable: NaN, as TRL 1.16's GRPOTrainer
            assert math.isnan(got) and bool(scores.unscorable[row])
        else:
            want = math.fsum(v * w for v, w in scored)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-3)
    assert scores.per_function.shape == (6, len(fns))
    assert scores.per_function.dtype == torch.float32


def test_per_function_stats_over_the_scored_values_equal_trl_nanstd() -> None:
    a = [1.0, None, 0.0, 1.0, None, 1.0]
    b = [0.5, 0.25, None, None, None, None]
    c = [None, None, None, None, None, 2.0]  # one value: its std is NaN (TRL's nanstd too)
    rs = RewardSet(
        [
            RewardFn(name="a", fn=_const(a), weight=1.0),
            RewardFn(name="b", fn=_const(b), weight=2.0),
            RewardFn(name="c", fn=_const(c), weight=0.5),
        ]
    )
    texts = [""] * 6
    scores = rs.score(texts, texts, [[]] * 6)
    m = scores.metrics()
    for name, col in (("a", a), ("b", b), ("c", c)):
        kept = [v for v in col if v is not None]
        assert m[f"reward/{name}"] == pytest.approx(statistics.fmean(kept))
        ref = float(nanstd(torch.tensor([math.nan if v is None else v for v in col])))
        if len(kept) > 1:
            assert m[f"reward/{name}/std"] == pytest.approx(statistics.stdev(kept))
            assert m[f"reward/{name}/std"] == pytest.approx(ref)
        else:
            assert math.isnan(m[f"reward/{name}/std"]) and math.isnan(ref)
        assert m[f"reward/{name}/none"] == col.count(None)
        assert m[f"reward/{name}/failed"] == 0
    # rows: 1+1, 0.5 (b), 0, 1, unscorable, 1 + 1
    assert scores.total.tolist()[:4] == [2.0, 0.5, 0.0, 1.0]
    assert math.isnan(scores.total[4]) and scores.total[5] == 2.0
    assert m["reward/unscorable"] == 1
    assert m["reward"] == pytest.approx(statistics.fmean([2.0, 0.5, 0.0, 1.0, 2.0]))
    assert m["reward_std"] == pytest.approx(statistics.stdev([2.0, 0.5, 0.0, 1.0, 2.0]))


def test_a_user_function_from_yaml_scores_quickstart_records_beside_exact_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    cfg = RewardsConfig(
        functions=[
            RewardConfig(fn="exact_match"),
            RewardConfig(fn="quickstart_rewards:positional_credit", weight=0.5),
        ]
    )
    rs = build_reward_set(cfg)
    assert rs.names == ("exact_match", "positional_credit")
    prompts, answers, ids, columns = _batch()
    half = [" " + " ".join(a.split()[:1] + ["?"] * (len(a.split()) - 1)) for a in answers]
    scores = rs.score(prompts, half, ids, columns)
    for row, r in enumerate(RECORDS):
        credit = scores.per_function[row, 1]
        if r["task"] == "add":  # one number: the example function leaves it to exact match
            assert math.isnan(credit) and scores.total[row] == scores.per_function[row, 0]
        else:
            n = len(r["completion"].split())
            assert float(credit) == pytest.approx(1 / n)
    full = rs.score(prompts, answers, ids, columns)
    adds = [r["task"] == "add" for r in RECORDS]
    assert full.total.tolist() == [1.0 if add else 1.5 for add in adds]


class _Flaky:
    """Raises on the calls whose index is in ``bad`` (deterministically), else exact match."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, prompts, completions, completion_ids, **columns):
        self.calls += 1
        if self.calls - 1 in self.bad:
            raise TimeoutError(f"judge timed out\n  on call {self.calls - 1}")
        return exact_match(prompts, completions, completion_ids, **columns)


def _flaky_set(bad: set[int], fraction: float, window: int) -> RewardSet:
    return RewardSet(
        [
            RewardFn(name="exact", fn=exact_match, key="task.rewards.functions[0]"),
            RewardFn(name="flaky", fn=_Flaky(bad), key="task.rewards.functions[1]"),
        ],
        max_failure_fraction=fraction,
        failure_window=window,
    )


def test_a_raising_function_scores_none_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rs = _flaky_set({0}, fraction=0.1, window=20)
    with caplog.at_level(logging.WARNING, logger="tscale.rewards"):
        scores = rs.score(*_batch())
    n = len(RECORDS)
    assert scores.per_function[:, 1].isnan().all()
    assert scores.total.tolist() == [1.0] * n  # the other function still scores every row
    assert scores.failed == (0, n)
    assert scores.failures[0].name == "flaky"
    assert scores.failures[0].error == "TimeoutError: judge timed out on call 0"
    m = scores.metrics()
    assert m["reward/flaky/failed"] == n and m["reward/flaky/none"] == n
    assert math.isnan(m["reward/flaky"])
    assert "reward 'flaky' (task.rewards.functions[1]) raised TimeoutError" in caplog.text
    assert "1 of its last 1 calls raised" in caplog.text
    again = rs.score(*_batch())  # the next call works again
    assert again.failed == (0, 0) and again.per_function[:, 1].tolist() == [1.0] * n


def test_the_run_stops_when_failures_exceed_the_fraction_of_the_window() -> None:
    # 0.1 of a window of 20 allows 2 raises; the third within 20 calls stops the run
    rs = _flaky_set({1, 5, 9}, fraction=0.1, window=20)
    for _ in range(9):
        rs.score(*_batch())
    with pytest.raises(RewardError) as info:
        rs.score(*_batch())
    message = str(info.value)
    assert "reward 'flaky' (task.rewards.functions[1]) raised on 3 of its last 20 calls" in message
    assert "max_failure_fraction=0.1" in message
    assert "TimeoutError: judge timed out on call 9" in message
    assert "\n" not in message


def test_failures_further_apart_than_the_window_never_stop_the_run() -> None:
    rs = _flaky_set({0, 4, 8, 12, 16, 20}, fraction=0.25, window=4)  # one per window
    for _ in range(24):
        rs.score(*_batch())


def test_max_failure_fraction_zero_stops_on_the_first_raise_and_one_never() -> None:
    with pytest.raises(RewardError, match="raised on 1 of its last 5 calls"):
        _flaky_set({0}, fraction=0.0, window=5).score(*_batch())
    always = _flaky_set(set(range(30)), fraction=1.0, window=5)
    for _ in range(30):
        assert always.score(*_batch()).failed[1] == len(RECORDS)


def test_scoring_without_tracking_leaves_the_window_alone() -> None:
    rs = _flaky_set({0, 1}, fraction=0.0, window=5)
    rs.score(*_batch(), track_failures=False)
    rs.score(*_batch(), track_failures=False)
    rs.score(*_batch())  # the window saw no raise


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([1.0] * 3, r"reward 'bad' \(k\) returned 3 values for 24 completions"),
        ("1" * 24, r"reward 'bad' \(k\) returned a str; expected a list of 24 floats"),
        (1.0, r"returned a float; expected a list of 24 floats"),
        ({"a": 1}, r"returned a dict; expected a list"),
        ([1.0] * 23 + ["1"], r"returned a str at index 23 \('1'\); expected a float or None"),
        ([1.0] * 23 + [torch.tensor(1.0)], r"returned a Tensor at index 23"),
        ([1.0] * 5 + [math.nan] * 19, r"returned nan at index 5; return None for a completion"),
        ([math.inf] * 24, r"returned inf at index 0"),
    ],
)
def test_a_broken_output_is_one_clear_error_naming_the_function(output, message) -> None:
    rs = RewardSet([RewardFn(name="bad", fn=_const_any(output), key="k")])
    with pytest.raises(RewardError, match=message) as info:
        rs.score(*_batch())
    assert "\n" not in str(info.value)


def _const_any(output):
    def fn(prompts, completions, completion_ids, **columns):
        return output

    return fn


def test_tensor_bool_and_numpy_outputs_are_floats() -> None:
    import numpy as np

    n = len(RECORDS)
    rs = RewardSet(
        [
            RewardFn(name="t", fn=_const_any(torch.ones(n))),
            RewardFn(name="b", fn=_const_any([True] * n)),
            RewardFn(name="np", fn=_const_any(np.full(n, 0.5, dtype=np.float32))),
        ]
    )
    assert rs.score(*_batch()).total.tolist() == [2.5] * n


def test_batch_shape_errors_and_missing_columns() -> None:
    prompts, completions, ids, columns = _batch()
    rs = RewardSet([RewardFn(name="exact_match", fn=exact_match)])
    with pytest.raises(ShapeError, match="23 prompts for 24 completions"):
        rs.score(prompts[:-1], completions, ids, columns)
    with pytest.raises(ShapeError, match="column 'task' has 2 values for 24 completions"):
        rs.score(prompts, completions, ids, {**columns, "task": ["a", "b"]})
    with pytest.raises(ShapeError, match="a column is named 'prompts'"):
        rs.score(prompts, completions, ids, {**columns, "prompts": prompts})

    def needs_answer(prompts, completions, completion_ids, answer):
        return [0.0] * len(completions)

    strict = RewardSet([RewardFn(name="needs", fn=needs_answer, key="task.rewards.functions[0]")])
    with pytest.raises(RewardError, match=r"needs 'answer', which is neither a column .*task\)"):
        strict.score(prompts, completions, ids, columns)
    # a function without **columns gets only the columns it names
    assert strict.score(prompts, completions, ids, {**columns, "answer": completions}).failed == (
        0,
    )
