"""The log-prob contract: the training forward (plain ``apply`` over prompt + completion rows)
reproduces the log-probs the sampler recorded, within 1e-5 in float32, in the sampler's
left-padded layout and in a right-padded one, for a Transformer and a LoRA stack; and the check
catches a sampler that records the wrong distribution (top-k truncated, temperature missing).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import rng
from tscale.errors import ShapeError
from tscale.losses.rl import policy_loss
from tscale.models import Transformer, TransformerConfig
from tscale.models.lora import LoraConfig, LoraModel
from tscale.rl import completion_logps, logprob_mismatch, rollout_batch, sample_completions

CONFIG = TransformerConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.1,
)
MODEL = Transformer(CONFIG)
PARAMS = MODEL.init(rng.key(0))
PROMPTS = [[5, 9, 2, 33], [7], [40, 41, 42, 43, 44, 45, 46], [1, 1], [3, 4, 5]]
PAD = 0
FORWARD_KEYS = ("input_ids", "position_ids", "doc_ids")


def _train_mismatch(model, params, rollout, layout: str, frozen=None, temperature=None) -> float:
    """The contract check as a training step does it: one plain forward, no cache."""
    batch = rollout_batch(rollout, layout=layout)
    kw = {} if frozen is None else {"frozen": frozen}
    logits = model.apply(params, {k: batch[k] for k in FORWARD_KEYS}, **kw)
    t = rollout.temperature if temperature is None else temperature
    train = completion_logps(logits, batch["labels"], t)
    return float(logprob_mismatch(train, batch["sampler_logps"], batch["labels"] != -100))


def _rollout(model=MODEL, params=PARAMS, **kw):
    args = {"num_samples": 3, "key": rng.key(7), "max_new_tokens": 9, "pad_id": PAD}
    return sample_completions(model, params, PROMPTS, **{**args, **kw})


@pytest.mark.parametrize("layout", ["left", "right"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_training_forward_reproduces_sampler_logps(layout: str, temperature: float) -> None:
    free = _rollout(temperature=temperature)
    stops = sorted({row[3] for row in free.completions()[:4]})  # tokens some rows emit early
    out = _rollout(temperature=temperature, stop_ids=stops)
    assert out.truncated.any() and not out.truncated.all()  # rows of several lengths
    assert _train_mismatch(MODEL, PARAMS, out, layout) <= 1e-5


def test_rollout_batch_layouts() -> None:
    out = _rollout(stop_ids=[3, 17])
    left, right = rollout_batch(out, layout="left"), rollout_batch(out, layout="right")
    width = max(len(p) for p in PROMPTS)
    assert left["input_ids"].shape[1] == width + 9
    for r, (row, n) in enumerate(zip(out.completions(), out.lengths.tolist(), strict=True)):
        prompt = PROMPTS[r // 3]
        real = right["input_ids"][r][right["doc_ids"][r] == 1].tolist()
        assert real == prompt + row == left["input_ids"][r][left["doc_ids"][r] == 1].tolist()
        for b in (left, right):
            scored = b["labels"][r] != -100
            assert b["labels"][r][scored].tolist() == row
            assert torch.equal(b["sampler_logps"][r][scored], out.sampler_logps[r, :n])
            assert b["position_ids"][r][b["doc_ids"][r] == 1].tolist() == list(range(len(real)))
    for b in (left, right):  # back to completion positions, as the RL losses take them
        by_token = b["sampler_logps"].gather(1, b["completion_index"])
        assert torch.equal(torch.where(b["completion_mask"], by_token, 0.0), out.sampler_logps)
        labels = b["labels"].gather(1, b["completion_index"])
        assert torch.equal(torch.where(b["completion_mask"], labels, PAD), out.completion_ids)


def test_lora_stack_reproduces_sampler_logps() -> None:
    lm = LoraModel(model=MODEL, config=LoraConfig(rank=4, alpha=8))
    frozen = {"base": PARAMS}
    g = torch.Generator().manual_seed(0)
    adapters = lm.init(rng.key(1), frozen=frozen)
    adapters = adapters.apply(lambda t: t + 0.2 * torch.randn(t.shape, generator=g))
    out = _rollout(lm, adapters, frozen=frozen, stop_ids=[3])
    assert not torch.equal(out.completion_ids, _rollout(stop_ids=[3]).completion_ids)  # adapted
    for layout in ("left", "right"):
        assert _train_mismatch(lm, adapters, out, layout, frozen=frozen) <= 1e-5


def test_logps_are_the_full_softmax_not_the_top_k_one() -> None:
    out = _rollout(temperature=0.8, top_k=2)
    batch = rollout_batch(out, layout="right")
    logits = MODEL.apply(PARAMS, {k: batch[k] for k in FORWARD_KEYS})
    mask = batch["labels"] != -100
    labels = batch["labels"].clamp_min(0)
    assert _train_mismatch(MODEL, PARAMS, out, "right") <= 1e-5
    # every drawn token is among the top 2, and the top-2 distribution gives it another log-prob
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == labels[..., None]).any(-1)[mask].all()
    truncated = (logits / 0.8).topk(2, dim=-1).values.log_softmax(-1)
    truncated_logp = torch.where(top2[..., 0] == labels, truncated[..., 0], truncated[..., 1])
    wrong = logprob_mismatch(truncated_logp, batch["sampler_logps"], mask)
    assert wrong > 1e-2


def test_check_catches_a_missing_temperature() -> None:
    out = _rollout(temperature=0.5)
    assert _train_mismatch(MODEL, PARAMS, out, "left") <= 1e-5
    assert _train_mismatch(MODEL, PARAMS, out, "left", temperature=1.0) > 1e-2


@settings(max_examples=30, deadline=None)
@given(
    logps=st.lists(st.floats(-20.0, 0.0), min_size=1, max_size=12),
    shift=st.floats(-2.0, 2.0),
    at=st.integers(0, 11),
)
def test_logprob_mismatch_is_the_largest_ratio_deviation(
    logps: list[float], shift: float, at: int
) -> None:
    sampler = torch.tensor(logps, dtype=torch.float32)
    mask = torch.ones_like(sampler, dtype=torch.bool)
    assert logprob_mismatch(sampler, sampler, mask) == 0
    at = at % len(logps)
    train = sampler.clone()
    train[at] += shift
    want = abs(torch.tensor(float(train[at]) - float(sampler[at]), dtype=torch.float64).expm1())
    assert torch.isclose(logprob_mismatch(train, sampler, mask).double(), want, rtol=1e-6)
    mask[at] = False  # a masked-out token never counts
    assert logprob_mismatch(train, sampler, mask) == 0


def test_logprob_mismatch_edge_cases() -> None:
    empty = torch.zeros(0)
    assert logprob_mismatch(empty, empty, empty.bool()) == 0
    inf = torch.tensor([float("-inf"), -1.0])
    assert logprob_mismatch(inf, torch.tensor([0.0, -1.0]), torch.tensor([False, True])) == 0
    with pytest.raises(ShapeError, match="shapes differ"):
        logprob_mismatch(torch.zeros(2), torch.zeros(3), torch.ones(2, dtype=torch.bool))


def test_first_update_ratio_is_one_through_the_policy_loss() -> None:
    """Rollout -> training rows -> forward -> completion positions -> GRPO loss: the ratio of
    the first update (π_train / π_sampler) is 1 within the contract, so nothing is clipped."""
    out = _rollout(temperature=0.7, top_p=0.9, stop_ids=[3])
    batch = rollout_batch(out, layout="right")
    params = PARAMS.clone().apply(lambda t: t.requires_grad_(True))
    logits = MODEL.apply(params, {k: batch[k] for k in FORWARD_KEYS})
    per_pos = completion_logps(logits, batch["labels"], out.temperature)
    logps = per_pos.gather(1, batch["completion_index"])
    mask = batch["completion_mask"]
    advantages = torch.linspace(-1.0, 1.0, out.num_completions)
    res = policy_loss(logps, out.sampler_logps, advantages, mask.float(), loss_type="dapo")
    m = res.metrics  # max/min metrics hold their value; a mean holds its weighted sum
    assert abs(float(m["ratio/max"].value) - 1) <= 1e-5
    assert abs(float(m["ratio/min"].value) - 1) <= 1e-5
    assert float(m["clip_ratio/region_mean"].value) == 0
    want = -(advantages[:, None] * mask).sum()
    torch.testing.assert_close(res.loss_sum.detach(), want, atol=1e-4, rtol=1e-5)
    assert res.loss_sum.requires_grad  # the training side builds the graph, the sampler did not
