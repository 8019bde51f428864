"""Config records of the reward functions of an online-RL run (a task's ``rewards`` section).

YAML::

    rewards:
      functions:
        - {fn: exact_match, weight: 1.0}
        - {fn: format_match, weight: 0.1, kwargs: {pattern: '(?: \\S+)+'}}
        - {fn: my_rewards:brevity, weight: 0.5, name: brevity}
        - {model: runs/reward_quickstart/hf, weight: 1.0, name: rm}
      max_failure_fraction: 0.1
      failure_window: 20

:func:`tscale.rewards.build_reward_set` turns the section into a :class:`RewardSet`.
"""

# ruff: noqa: RUF009 - `field` returns an attrs field (a default declaration), not a shared value

from __future__ import annotations

from typing import Any

import attrs

from tscale.core.fields import field

__all__ = ["RewardConfig", "RewardsConfig"]


@attrs.frozen(kw_only=True)
class RewardConfig:
    """One reward function (``fn``, or a trained reward model's folder, ``model``), its weight in
    the total and its keyword arguments."""

    fn: str | None = field(
        None,
        "A built-in reward (exact_match, format_match, ends_with_stop, "
        "soft_overlong_punishment) or module:function of your own (docs/rewards.md); null "
        "and no model: exact_match.",
    )
    model: str | None = field(
        None,
        "Instead of fn: the folder of a trained reward model, as a task.type: reward run "
        "exports it (docs/rewards.md#reward-models); its kwargs: batch_size, dtype.",
    )
    weight: float = field(
        1.0, "Its weight in the total reward (0: logged, not trained on).", finite=True
    )
    kwargs: dict[str, Any] = field(
        {}, "Keyword arguments it is called with (e.g. answer_column, pattern)."
    )
    name: str | None = field(
        None,
        "Its name in the metrics (reward/<name>); null: the function's name (reward_model "
        "for a model). Two entries with the same function need distinct names.",
    )


@attrs.frozen(kw_only=True)
class RewardsConfig:
    """The reward functions of a run and when their failures stop it."""

    functions: list[RewardConfig] = field(
        [RewardConfig(fn="exact_match")],
        "The reward functions; the total reward is their weighted sum (a None skipped; all "
        "None: unscorable).",
    )
    max_failure_fraction: float = field(
        0.1,
        "Stop the run when a reward function raised on more than this fraction of its last "
        "failure_window calls (0: on the first raise).",
        ge=0.0,
        le=1.0,
    )
    failure_window: int = field(20, "The calls max_failure_fraction looks back over.", ge=1)
