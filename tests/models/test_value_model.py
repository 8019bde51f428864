"""PPO's value function beside the policy (:mod:`tscale.models.value`): the policy computes on
its own params whatever value trees sit beside them, one trunk forward gives the logits and the
shared head's values, the separate critic is a reward model over its own tree, and the value
trees' gradients are theirs alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.models.generate import generate
from tscale.models.reward import RewardHead, RewardModel, with_score_head
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.models.value import (
    CRITIC,
    VALUE_HEAD,
    PolicyWithValue,
    find_policy_with_value,
    policy_params,
)

CFG = TransformerConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
MODEL = Transformer(CFG)
PARAMS = MODEL.init(R.key(0))
BATCH = {"input_ids": torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))}


def shared() -> tuple[PolicyWithValue, object]:
    pv = PolicyWithValue(MODEL, head=RewardHead.of(CFG))
    return pv, pv.with_value(PARAMS, R.key(1))


def separate() -> tuple[PolicyWithValue, object]:
    critic = RewardModel(Transformer(CFG), RewardHead.of(CFG))
    pv = PolicyWithValue(MODEL, critic=critic)
    return pv, pv.with_value(
        PARAMS, R.key(1), critic=with_score_head(T.clone(PARAMS), R.key(1), CFG)
    )


@pytest.mark.parametrize("make", [shared, separate])
def test_the_policy_ignores_the_value_trees(make: Callable[[], tuple]) -> None:
    pv, params = make()
    assert set(params.keys()) - set(PARAMS.keys()) in ({VALUE_HEAD}, {CRITIC})
    torch.testing.assert_close(pv.apply(params, BATCH), MODEL.apply(PARAMS, BATCH), rtol=0, atol=0)
    assert set(policy_params(params).keys()) == set(PARAMS.keys())
    prompts = BATCH["input_ids"][:2].tolist()  # the KV-cache path, too
    kw = {"max_new_tokens": 5, "pad_id": 0}
    assert generate(pv, params, prompts, **kw) == generate(MODEL, PARAMS, prompts, **kw)


def test_one_trunk_forward_gives_logits_and_values() -> None:
    pv, params = shared()
    h = pv.hidden_states(params, BATCH)
    torch.testing.assert_close(pv.logits_from_hidden(params, h), MODEL.apply(PARAMS, BATCH))
    w = params[VALUE_HEAD, "weight"]
    assert w.shape == (1, CFG.hidden_size)
    assert float(w.std()) == pytest.approx(CFG.init_std, rel=0.35)  # a score head's init
    torch.testing.assert_close(pv.values_from_hidden(params, h), (h @ w.T)[..., 0])


def test_the_critic_is_a_reward_model_over_its_own_tree() -> None:
    pv, params = separate()
    reward = RewardModel(Transformer(CFG), RewardHead.of(CFG))
    expected = reward.apply(params[CRITIC], BATCH)[..., 0]
    torch.testing.assert_close(pv.critic_values(params, BATCH), expected)
    # the critic starts from the policy's trunk with the head the shared one would get
    shared_pv, shared_params = shared()
    h = shared_pv.hidden_states(shared_params, BATCH)
    torch.testing.assert_close(expected, shared_pv.values_from_hidden(shared_params, h))
    assert find_policy_with_value(pv) is pv


def test_value_loss_trains_only_the_value_trees_of_a_separate_critic() -> None:
    pv, params = separate()
    grad_fn = value_and_grad(lambda p: (pv.critic_values(p, BATCH).square().sum(), {}))
    _, grads = grad_fn(params)
    flat = T.flatten(grads)
    assert all(float(v.abs().sum()) == 0 for k, v in flat.items() if not k.startswith(CRITIC))
    assert float(flat[f"{CRITIC}.score.weight"].abs().sum()) > 0


def test_exactly_one_value_function() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PolicyWithValue(MODEL)
