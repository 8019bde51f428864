"""Online RL's generation side: rollouts from the current policy and the log-prob contract.

- :func:`sample_completions` -> :class:`Rollout`: G completions per prompt with the KV cache,
  keyed per (prompt, sample, position), log π of every sampled token recorded;
- :func:`rollout_batch`, :func:`completion_logps`, :func:`logprob_mismatch`: the training
  forward's rows and log-probs, and how far they are from the sampler's (issue 15, item 4).
"""

from tscale.rl.contract import completion_logps, logprob_mismatch, rollout_batch
from tscale.rl.rollout import Rollout, sample_completions
from tscale.rl.sampling import completion_keys, prompt_keys, sample_tokens, token_logps

__all__ = [
    "Rollout",
    "completion_keys",
    "completion_logps",
    "logprob_mismatch",
    "prompt_keys",
    "rollout_batch",
    "sample_completions",
    "sample_tokens",
    "token_logps",
]
