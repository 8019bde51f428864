"""PPO's value function beside the policy: a ``[1, H]`` head on the policy's trunk (``shared``)
or a critic model of its own (``separate``), both trainable trees in the same params.

- ``shared``: ``params["value_head"]["weight"]`` [1, H], initialised as a reward model's
  ``score.weight`` (:func:`tscale.models.reward.init_score`). The value of a position is its
  final-normed hidden state times that weight, so one trunk forward gives the logits (through
  the LM head) and the values (Stiennon et al. 2020 and TRL's ``AutoModelForCausalLMWithValueHead``
  put the head on the policy's trunk this way).
- ``separate``: ``params["critic"]`` holds a whole reward model (:class:`~tscale.models.reward.
  RewardModel`'s params: a decoder without ``lm_head`` and ``score.weight``), as TRL's
  ``PPOTrainer`` keeps its ``value_model`` (an ``*ForSequenceClassification``). It costs a second
  decoder: its params, gradients and optimizer moments, and a second forward and backward.

:class:`PolicyWithValue` implements the model protocol around the policy's stack: every method
runs the policy on the params *without* the value trees (:func:`policy_params`), so sampling,
evaluation and the reference see the policy alone; :meth:`PolicyWithValue.values_from_hidden`
and :meth:`PolicyWithValue.critic_values` give the values.

Pure: no I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.models.protocol import Batch, Frozen, Gather, Wrapper, layers
from tscale.models.reward import RewardHead, RewardModel, init_score

__all__ = [
    "CRITIC",
    "VALUE_HEAD",
    "VALUE_KEYS",
    "PolicyWithValue",
    "find_policy_with_value",
    "policy_params",
]

VALUE_HEAD = "value_head"
"""The params key of the shared value head (``value_head.weight`` [1, H])."""
CRITIC = "critic"
"""The params key of a separate critic (a reward model's params)."""
VALUE_KEYS = (VALUE_HEAD, CRITIC)
_VALUE_SALT = 0x7A1E


def policy_params(params: TensorDictBase) -> TensorDictBase:
    """``params`` without the value trees (what the policy computes with, and what an export
    writes)."""
    present = [k for k in VALUE_KEYS if k in params.keys()]  # noqa: SIM118
    return params.exclude(*present) if present else params


@attrs.frozen(eq=False)
class PolicyWithValue(Wrapper):
    """The policy ``inner`` with a value function beside it (see the module docstring).

    Attributes:
        inner: the policy's model stack.
        head: the shared head's settings (hidden size, init std); None with a critic.
        critic: the separate critic (a reward model over a plain decoder); None when shared.
    """

    inner: Any
    head: RewardHead | None = None
    critic: RewardModel | None = None

    def __attrs_post_init__(self) -> None:
        if (self.head is None) == (self.critic is None):
            raise ValueError("PolicyWithValue: give exactly one of head (shared) or critic")

    @property
    def shared(self) -> bool:
        """True: the value head reads the policy's hidden states."""
        return self.critic is None

    @contextlib.contextmanager
    def around(
        self, params: TensorDictBase, gather: Gather | None, frozen: Frozen | None
    ) -> Iterator[tuple[TensorDictBase, Gather | None]]:
        """The policy's params alone; the hook as given."""
        yield policy_params(params), gather

    def init(self, key: torch.Tensor, **kw: Any) -> TensorDict:
        """The policy's fresh params plus fresh value trees."""
        params = self.inner.init(key, **kw)
        leaf = next(t for t in T.leaves(params) if t.is_floating_point())
        return self.with_value(params, R.fold_in(key, _VALUE_SALT), dtype=leaf.dtype)

    def with_value(
        self,
        params: TensorDictBase,
        key: torch.Tensor,
        *,
        critic: TensorDictBase | None = None,
        dtype: torch.dtype | None = None,
    ) -> TensorDict:
        """``params`` plus the value trees: a fresh head (shared), or ``critic`` (a reward
        model's params; a fresh one from ``key`` when None)."""
        leaf = next(t for t in T.leaves(params) if t.is_floating_point())
        dtype, device = dtype or leaf.dtype, leaf.device
        flat = T.flatten(params)
        if self.head is not None:
            h = self.head
            flat[f"{VALUE_HEAD}.weight"] = init_score(
                key, h.hidden_size, std=h.init_std, dtype=dtype, device=device
            )
            return T.unflatten(flat)
        assert self.critic is not None
        tree = critic if critic is not None else self.critic.init(key)
        out = T.unflatten(flat)
        out[CRITIC] = tree.to(device)
        return out

    def values_from_hidden(self, params: TensorDictBase, h: torch.Tensor) -> torch.Tensor:
        """Values [...] of hidden states [..., H] of the policy's trunk (shared head), in
        ``h``'s dtype."""
        if not self.shared:
            raise ValueError("values_from_hidden: this value function is a separate critic")
        w = params[VALUE_HEAD, "weight"]
        return F.linear(h, w.to(h.dtype))[..., 0]

    def critic_values(self, params: TensorDictBase, batch: Batch) -> torch.Tensor:
        """Values [B, S] (or [B, M] at ``batch["logits_index"]``) of the separate critic."""
        if self.critic is None:
            raise ValueError("critic_values: this value function is a shared head")
        return self.critic.apply(params[CRITIC], batch)[..., 0]


def find_policy_with_value(model: Any) -> PolicyWithValue:
    """The :class:`PolicyWithValue` in ``model``'s stack (parallel and cast wrappers may sit
    outside it).

    Raises:
        ValueError: there is none.
    """
    for m in layers(model):
        if isinstance(m, PolicyWithValue):
            return m
    raise ValueError("the model has no value function (PolicyWithValue) in its stack")
