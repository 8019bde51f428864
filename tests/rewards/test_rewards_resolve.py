"""Reward functions named in YAML: built-ins, module:function imports with clear errors, the
signature contract, kwargs checks, and the config records (domains through the YAML loader)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tscale.config.load import load_config
from tscale.errors import ConfigError
from tscale.rewards import (
    RewardConfig,
    RewardsConfig,
    build_reward_set,
    exact_match,
    resolve_reward_fn,
)

MODULE = """
LIMIT = 3

def brevity(prompts, completions, completion_ids, **columns):
    return [1.0 if len(ids) <= LIMIT else 0.0 for ids in completion_ids]

def by_column(prompts, completions, completion_ids, answer, *, scale=1.0):
    return [scale * float(c == a) for c, a in zip(completions, answer)]

def positional(prompts, completions, /, completion_ids):
    return []

def too_few(completions):
    return []

def brevvity_helper():
    pass

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def _fns(*configs: RewardConfig) -> RewardsConfig:
    return RewardsConfig(functions=list(configs))


def test_built_ins_and_user_functions_resolve(user_module: str) -> None:
    assert resolve_reward_fn("exact_match") is exact_match
    import my_rewards

    assert resolve_reward_fn("my_rewards:brevity") is my_rewards.brevity


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "exact_mach",
            r"^task.rewards.functions\[0\].fn: unknown reward 'exact_mach' \(did you mean "
            r"'exact_match'\?\); built-in: ends_with_stop, exact_match, format_match, "
            r"soft_overlong_punishment, or module:function for your own$",
        ),
        (
            "no_such_module_xyz:f",
            r"^task.rewards.functions\[0\].fn: cannot import 'no_such_module_xyz' \(No module "
            r"named 'no_such_module_xyz'\); is its folder on PYTHONPATH\?$",
        ),
        (
            "broken_rewards:f",
            r"cannot import 'broken_rewards' \(No module named 'no_such_dependency_xyz'\); is its "
            r"folder on PYTHONPATH\?",
        ),
        (
            "my_rewards:brevty",
            r"^task.rewards.functions\[0\].fn: module 'my_rewards' has no 'brevty'; did you mean "
            r"'brevity'\?$",
        ),
        ("my_rewards:zzz", r"^task.rewards.functions\[0\].fn: module 'my_rewards' has no 'zzz'$"),
        (
            "my_rewards:NOT_A_FUNCTION",
            r"my_rewards:NOT_A_FUNCTION is not callable \(its type is int\); a reward is "
            r"fn\(prompts, completions, completion_ids, \*\*columns\)",
        ),
        ("my_rewards:", r"'my_rewards:' is not module:function"),
        (
            "my_rewards:positional",
            r"takes prompts, completions, completion_ids and the columns by keyword .*positional "
            r"takes \(prompts, completions, /, completion_ids\)",
        ),
        ("my_rewards:too_few", r"too_few takes \(completions\)"),
    ],
)
def test_import_and_signature_errors_are_one_line_naming_the_key(
    user_module: str, name: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_reward_set(_fns(RewardConfig(fn=name)))
    assert "\n" not in str(info.value)


def test_kwargs_checks(user_module: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"functions\[1\]\.kwargs\.answer_colum: exact_match takes no setting "
        r"'answer_colum' \(it takes: answer_column\); did you mean 'answer_column'\?",
    ):
        build_reward_set(
            _fns(RewardConfig(), RewardConfig(fn="exact_match", kwargs={"answer_colum": "a"}))
        )
    # a user function without **kwargs: settings must name its parameters
    with pytest.raises(
        ConfigError,
        match=r"kwargs\.scal: my_rewards:by_column takes no setting 'scal' "
        r"\(it takes: answer, scale\)",
    ):
        build_reward_set(_fns(RewardConfig(fn="my_rewards:by_column", kwargs={"scal": 2.0})))
    with pytest.raises(ConfigError, match=r"kwargs\.prompts: is a reward argument"):
        build_reward_set(_fns(RewardConfig(fn="my_rewards:by_column", kwargs={"prompts": 1})))
    # with **kwargs any setting passes through to it
    rs = build_reward_set(_fns(RewardConfig(fn="my_rewards:brevity", kwargs={"anything": 1})))
    assert rs.functions[0].kwargs == {"anything": 1}
    rs = build_reward_set(_fns(RewardConfig(fn="my_rewards:by_column", kwargs={"scale": 2.0})))
    texts = ["a", "b"]
    out = rs.score(texts, texts, [[1], [2]], {"answer": ["a", "c"], "other": [0, 0]})
    assert out.per_function[:, 0].tolist() == [2.0, 0.0]


def test_names_default_to_the_function_and_must_be_distinct(user_module: str) -> None:
    rs = build_reward_set(
        _fns(RewardConfig(fn="my_rewards:brevity"), RewardConfig(fn="exact_match", weight=2))
    )
    assert rs.names == ("brevity", "exact_match") and rs.weights == (1.0, 2.0)
    with pytest.raises(
        ConfigError,
        match=r"task.rewards.functions\[1\]: its name 'exact_match' is the name of "
        r"functions\[0\] too; set a distinct name",
    ):
        build_reward_set(_fns(RewardConfig(), RewardConfig(kwargs={"answer_column": "answer"})))
    both = build_reward_set(
        _fns(RewardConfig(), RewardConfig(kwargs={"answer_column": "answer"}, name="em_answer"))
    )
    assert both.names == ("exact_match", "em_answer")


def test_the_records_load_from_yaml_with_their_domains(tmp_path: Path) -> None:
    path = tmp_path / "rewards.yaml"
    path.write_text(
        textwrap.dedent(
            """
            functions:
              - {fn: exact_match}
              - fn: format_match
                weight: 0.25
                kwargs: {pattern: '(?: \\S+)+'}
            max_failure_fraction: 0.2
            """
        )
    )
    cfg = load_config(path, cls=RewardsConfig)
    assert cfg.functions[1] == RewardConfig(
        fn="format_match", weight=0.25, kwargs={"pattern": r"(?: \S+)+"}
    )
    assert (cfg.max_failure_fraction, cfg.failure_window) == (0.2, 20)
    assert build_reward_set(cfg).names == ("exact_match", "format_match")
    assert load_config(None, cls=RewardsConfig).functions == [RewardConfig(fn="exact_match")]
    with pytest.raises(ConfigError, match=r"functions\[0\].weight must be a finite number, got"):
        load_config({"functions": [{"weight": float("inf")}]}, cls=RewardsConfig)
    with pytest.raises(ConfigError, match=r"max_failure_fraction must be in \[0, 1\], got 1.5"):
        load_config({"max_failure_fraction": 1.5}, cls=RewardsConfig)
    with pytest.raises(ConfigError, match=r"failure_window must be >= 1, got 0"):
        load_config({"failure_window": 0}, cls=RewardsConfig)
    with pytest.raises(
        ConfigError,
        match=r"rewards.yaml:2: unknown key 'functions\[0\].wieght'; did you mean "
        r"'functions\[0\].weight'\?",
    ):
        path.write_text("functions:\n  - {fn: exact_match, wieght: 2}\n")
        load_config(path, cls=RewardsConfig)
