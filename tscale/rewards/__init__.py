"""Reward functions for online RL: the contract, the built-ins, trained reward models as rewards,
weighted scoring of a batch with failure accounting, and fingerprints that catch a changed or
nondeterministic reward on resume (docs/rewards.md)."""

from tscale.rewards.builtin import (
    ends_with_stop,
    exact_match,
    format_match,
    soft_overlong_punishment,
)
from tscale.rewards.config import RewardConfig, RewardsConfig
from tscale.rewards.fingerprint import (
    RewardProbe,
    check_fingerprint,
    compare_fingerprints,
    fingerprint_rewards,
    make_probe,
)
from tscale.rewards.model import RewardModelReward, check_same_tokenizer
from tscale.rewards.resolve import REWARDS, register_reward, resolve_reward_fn
from tscale.rewards.scoring import (
    FailureLimit,
    RewardFailure,
    RewardFn,
    RewardSet,
    Scores,
    build_reward_set,
    failure_limit_error,
)

__all__ = [
    "REWARDS",
    "FailureLimit",
    "RewardConfig",
    "RewardFailure",
    "RewardFn",
    "RewardModelReward",
    "RewardProbe",
    "RewardSet",
    "RewardsConfig",
    "Scores",
    "build_reward_set",
    "check_fingerprint",
    "check_same_tokenizer",
    "compare_fingerprints",
    "ends_with_stop",
    "exact_match",
    "failure_limit_error",
    "fingerprint_rewards",
    "format_match",
    "make_probe",
    "register_reward",
    "resolve_reward_fn",
    "soft_overlong_punishment",
]
