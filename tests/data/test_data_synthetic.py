"""Synthetic tasks: answers are right, splits are disjoint, everything follows from the seed."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.data import TASKS, generate, make_splits, write_jsonl


def solve(prompt: str) -> str:
    """An independent reference solver for the built-in tasks."""
    task, _, body = prompt.partition(": ")
    if task == "reverse":
        return " " + " ".join(body.split()[::-1])
    if task == "sort":
        return " " + " ".join(sorted(body.split(), key=int))
    if task == "add":
        a, plus, b = body.split()
        assert plus == "+"
        return f" {int(a) + int(b)}"
    raise AssertionError(f"unknown task in {prompt!r}")


def num_items(record: dict) -> int:
    body = record["prompt"].split(": ", 1)[1]
    if record["task"] == "add":
        a, _, b = body.split()
        return len(a) + len(b)
    return len(body.split())


task_lists = st.lists(st.sampled_from(TASKS), min_size=1, max_size=3, unique=True)


@settings(max_examples=60, deadline=None)
@given(
    tasks=task_lists,
    n=st.integers(0, 60),
    seed=st.integers(0, 2**32),
    min_items=st.integers(2, 6),
    extra=st.integers(0, 4),
)
def test_completions_are_correct_and_in_bounds(tasks, n, seed, min_items, extra):
    max_items = min_items + extra
    recs = generate(tasks, n, seed=seed, min_items=min_items, max_items=max_items)
    assert len(recs) == n
    for r in recs:
        assert set(r) == {"prompt", "completion", "task"}
        assert r["prompt"].startswith(r["task"] + ": ")
        assert r["completion"] == solve(r["prompt"])
        assert min_items <= num_items(r) <= max_items
    # Equal shares: counts differ by at most one between tasks.
    counts = Counter(r["task"] for r in recs)
    shares = [counts.get(t, 0) for t in tasks]
    assert max(shares) - min(shares) <= 1


def test_items_are_single_characters_and_numbers_have_no_leading_zero():
    recs = generate(list(TASKS), 300, seed=1, min_items=2, max_items=9)
    for r in recs:
        body = r["prompt"].split(": ", 1)[1]
        if r["task"] == "reverse":
            assert all(len(x) == 1 and x.isalpha() and x.islower() for x in body.split())
        elif r["task"] == "sort":
            assert all(len(x) == 1 and x.isdigit() for x in body.split())
        else:
            a, _, b = body.split()
            assert all(x == "0" or not x.startswith("0") for x in (a, b))


def test_generate_is_deterministic_and_seed_dependent():
    kw = dict(min_items=3, max_items=8)
    assert generate(["reverse", "sort"], 50, seed=7, **kw) == generate(
        ["reverse", "sort"], 50, seed=7, **kw
    )
    assert generate(["reverse", "sort"], 50, seed=7, **kw) != generate(
        ["reverse", "sort"], 50, seed=8, **kw
    )


def test_generate_respects_exclude():
    # sort with one digit has only 10 prompts; exclude 8 of them.
    excluded = {f"sort: {d}" for d in range(8)}
    recs = generate(["sort"], 40, seed=0, min_items=1, max_items=1, exclude=excluded)
    assert {r["prompt"] for r in recs} == {"sort: 8", "sort: 9"}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), tasks=task_lists)
def test_splits_disjoint_and_deterministic(seed, tasks):
    train, ev = make_splits(tasks, 300, 60, seed, 2, 4)
    assert len(train) == 300 and len(ev) == 60
    train_prompts = {r["prompt"] for r in train}
    eval_prompts = [r["prompt"] for r in ev]
    assert not train_prompts & set(eval_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)  # eval problems are distinct
    assert make_splits(tasks, 300, 60, seed, 2, 4) == (train, ev)


def test_splits_in_a_tiny_problem_space():
    # 100 two-digit sort prompts (items in any order): the eval takes 30, train never sees them.
    train, ev = make_splits(["sort"], 500, 30, 3, 2, 2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}


def test_exhausted_problem_space_is_an_error():
    with pytest.raises(ValueError, match="too few distinct problems"):
        make_splits(["sort"], 10, 11, 0, 1, 1)  # only 10 one-digit problems exist


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown.*'multiply'.*'reverse', 'sort', 'add'"):
        generate(["reverse", "multiply"], 3, seed=0, min_items=3, max_items=4)
    with pytest.raises(ValueError, match="unknown"):
        make_splits(["nope"], 3, 3, 0, 3, 4)


@pytest.mark.parametrize(
    ("tasks", "min_items", "max_items", "match"),
    [
        (["add"], 1, 4, "needs min_items >= 2"),
        (["sort"], 5, 4, "max_items"),
        ([], 3, 4, "no synthetic tasks"),
    ],
)
def test_bad_arguments(tasks, min_items, max_items, match):
    with pytest.raises(ValueError, match=match):
        generate(tasks, 3, seed=0, min_items=min_items, max_items=max_items)


def test_write_jsonl_round_trip_and_atomic_replace(tmp_path):
    recs = generate(["reverse", "add"], 20, seed=0, min_items=3, max_items=5)
    path = tmp_path / "sub" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    assert write_jsonl(recs, path) == path
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]  # no temp left


def test_write_jsonl_failure_keeps_old_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("old\n")

    def bad_records():
        yield {"prompt": "a", "completion": "b"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(bad_records(), path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]
