"""The built-in rewards on real quickstart records (tscale.data.synthetic.generate)."""

from __future__ import annotations

import pytest
from trl.rewards import get_soft_overlong_punishment

from tscale.data.synthetic import generate
from tscale.errors import ConfigError, RewardError
from tscale.rewards import (
    RewardConfig,
    RewardsConfig,
    build_reward_set,
    ends_with_stop,
    exact_match,
    format_match,
    soft_overlong_punishment,
)
from tscale.tasks.sft import reference_answer

RECORDS = generate(["reverse", "sort", "add"], 30, seed=3, min_items=2, max_items=5)
PROMPTS = [r["prompt"] for r in RECORDS]
ANSWERS = [r["completion"] for r in RECORDS]
COLUMNS = {"completion": ANSWERS, "task": [r["task"] for r in RECORDS]}
IDS = [[1, 2]] * len(RECORDS)
ITEMS = r"(?: \S+)+"  # the quickstart's answer format: space-separated items


def _wrong(answer: str) -> str:
    """A wrong answer in the right format: the last item changed."""
    *head, last = answer.split()
    return " " + " ".join([*head, last + "0"])


def test_exact_match_scores_the_reference_answer_one_and_a_wrong_one_zero() -> None:
    assert exact_match(PROMPTS, ANSWERS, IDS, **COLUMNS) == [1.0] * len(RECORDS)
    padded = [f"  {a}\n" for a in ANSWERS]  # whitespace at the ends does not count
    assert exact_match(PROMPTS, padded, IDS, **COLUMNS) == [1.0] * len(RECORDS)
    wrong = [_wrong(a) for a in ANSWERS]
    assert exact_match(PROMPTS, wrong, IDS, **COLUMNS) == [0.0] * len(RECORDS)
    # reversing a reverse task's answer is wrong unless it is a palindrome
    flipped = [" " + " ".join(reversed(a.split())) for a in ANSWERS]
    expected = [float(f.split() == a.split()) for f, a in zip(flipped, ANSWERS, strict=True)]
    assert exact_match(PROMPTS, flipped, IDS, **COLUMNS) == expected
    assert 0 < sum(expected) < len(RECORDS)  # both cases occur in these records


def test_exact_match_agrees_with_the_sft_eval_comparison() -> None:
    completions = [a if i % 3 else _wrong(a) for i, a in enumerate(ANSWERS)]
    got = exact_match(PROMPTS, completions, IDS, **COLUMNS)
    sft = [
        float(c.strip() == (reference_answer(r) or "").strip())
        for c, r in zip(completions, RECORDS, strict=True)
    ]
    assert got == sft


def test_exact_match_none_without_an_answer_and_a_configurable_column() -> None:
    answers = [None if i % 2 else a for i, a in enumerate(ANSWERS)]
    got = exact_match(PROMPTS, ANSWERS, IDS, answer_column="answer", answer=answers)
    assert got == [None if i % 2 else 1.0 for i in range(len(RECORDS))]
    with pytest.raises(ConfigError, match=r"no column 'answer' .*completion, task.*kwargs.answer"):
        exact_match(PROMPTS, ANSWERS, IDS, answer_column="answer", **COLUMNS)


def test_a_missing_answer_column_stops_scoring_with_the_yaml_key() -> None:
    rs = build_reward_set(
        RewardsConfig(functions=[RewardConfig(kwargs={"answer_column": "solution"})])
    )
    with pytest.raises(RewardError, match=r"functions\[0\].*no column 'solution'"):
        rs.score(PROMPTS, ANSWERS, IDS, COLUMNS)


def test_format_match_modes_and_flags() -> None:
    assert format_match(PROMPTS, ANSWERS, IDS, pattern=ITEMS) == [1.0] * len(RECORDS)
    texts = [" 1 2", "1 2", " 1 2 and more", "", " A b"]
    ids = [[]] * len(texts)
    full = format_match(texts, texts, ids, pattern=r"(?: [0-9a-z]+)+")
    assert full == [1.0, 0.0, 1.0, 0.0, 0.0]  # " 1 2 and more" is items too
    assert format_match(texts, texts, ids, pattern=r"\d") == [0.0] * 5  # the whole text
    assert format_match(texts, texts, ids, pattern=r"\d", mode="match") == [0.0, 1.0, 0, 0, 0]
    assert format_match(texts, texts, ids, pattern=r"\d", mode="search") == [1.0, 1.0, 1, 0, 0]
    assert format_match(texts, texts, ids, pattern=r" A", mode="search") == [0, 0, 0, 0, 1.0]
    case = format_match(texts, texts, ids, pattern=r" A", mode="search", flags=["IGNORECASE"])
    assert case == [0.0, 0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "(unclosed"}, r"functions\[0\]\.kwargs\.pattern: '\(unclosed' is not a valid"),
        ({"pattern": ITEMS, "mode": "find"}, r"kwargs\.mode: 'find' is not one of"),
        ({"pattern": ITEMS, "flags": ["VERBOSE"]}, r"kwargs\.flags: unknown flag 'VERBOSE'"),
        ({}, r"functions\[0\]\.kwargs: format_match needs 'pattern'"),
        ({"patern": ITEMS}, r"kwargs\.patern: .*did you mean 'pattern'\?"),
    ],
)
def test_format_match_settings_are_checked_when_the_set_is_built(
    kwargs: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_reward_set(RewardsConfig(functions=[RewardConfig(fn="format_match", kwargs=kwargs)]))


def test_ends_with_stop_and_its_ids_from_the_run() -> None:
    ids = [[5, 6, 2], [5, 6], [], [2, 7], [9]]
    texts = [""] * len(ids)
    assert ends_with_stop(texts, texts, ids, stop_ids=[2, 9]) == [1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match=r"ends_with_stop needs 'stop_ids'"):
        build_reward_set(RewardsConfig(functions=[RewardConfig(fn="ends_with_stop")]))
    rs = build_reward_set(
        RewardsConfig(functions=[RewardConfig(fn="ends_with_stop")]),
        run_kwargs={"stop_ids": [2], "unrelated": 1},  # given only to functions that name it
    )
    assert rs.score(texts, texts, ids).per_function[:, 0].tolist() == [1.0, 0, 0, 0, 0]


@pytest.mark.parametrize(("top", "cache"), [(20, 5), (16, 16), (10, 0), (1, 1)])
def test_soft_overlong_punishment_equals_trl(top: int, cache: int) -> None:
    ids = [[7] * n for n in range(0, top + 6)]
    texts = [""] * len(ids)
    ours = soft_overlong_punishment(
        texts, texts, ids, max_completion_length=top, soft_punish_cache=cache
    )
    trl = get_soft_overlong_punishment(max_completion_len=top, soft_punish_cache=cache)(ids)
    assert ours == trl
    assert ours[-1] == -1.0 and ours[0] == 0.0


def test_soft_overlong_settings_are_checked() -> None:
    def build(**kwargs: object) -> None:
        fn = RewardConfig(fn="soft_overlong_punishment", kwargs=kwargs)
        build_reward_set(RewardsConfig(functions=[fn]))

    with pytest.raises(ConfigError, match=r"kwargs\.soft_punish_cache: must be in \[0, "):
        build(max_completion_length=8, soft_punish_cache=9)
    with pytest.raises(ConfigError, match=r"kwargs\.max_completion_length: expected an integer"):
        build(max_completion_length="8", soft_punish_cache=2)
    build(max_completion_length=8, soft_punish_cache=2)
