"""Properties of GAE (:func:`tscale.losses.rl.gae`) on random right-padded completions:
with γ = λ = 1 the returns are the reward-to-go and the advantages the returns minus the values;
with λ = 0 the advantage is the one-step TD error; positions off the mask are 0 and change
nothing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.losses.rl import gae

finite = st.floats(-10.0, 10.0, allow_nan=False, width=64)


@st.composite
def episodes(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, values, mask)`` [N, T] float64, right-padded completions (some empty)."""
    n, t = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    rewards = torch.tensor(draw(st.lists(finite, min_size=n * t, max_size=n * t))).view(n, t)
    values = torch.tensor(draw(st.lists(finite, min_size=n * t, max_size=n * t))).view(n, t)
    lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=n, max_size=n)))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
    return rewards.double(), values.double(), mask


@settings(max_examples=60, deadline=None)
@given(episodes())
def test_gamma_lambda_one_gives_reward_to_go(data: tuple) -> None:
    rewards, values, mask = data
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    m = mask.double()
    to_go = (rewards * m).flip(1).cumsum(1).flip(1) * m  # Σ_{s ≥ t} r_s over the completion
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, (to_go - values) * m)


@settings(max_examples=60, deadline=None)
@given(episodes(), st.floats(0.0, 1.0))
def test_lambda_zero_gives_the_td_error(data: tuple, gamma: float) -> None:
    rewards, values, mask = data
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    m = mask.double()
    next_values = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], 1)
    expected = (rewards + gamma * next_values - values) * m
    torch.testing.assert_close(advantages, expected)


@settings(max_examples=40, deadline=None)
@given(episodes(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), finite)
def test_padding_is_zero_and_ignored(data: tuple, gamma: float, lam: float, junk: float) -> None:
    rewards, values, mask = data
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    off = mask == 0
    assert (advantages[off] == 0).all() and (returns[off] == 0).all()
    noisy_r = torch.where(off, torch.full_like(rewards, junk), rewards)
    noisy_v = torch.where(off, torch.full_like(values, -junk), values)
    again = gae(noisy_r, noisy_v, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(again[0], advantages)
    torch.testing.assert_close(again[1], returns)
