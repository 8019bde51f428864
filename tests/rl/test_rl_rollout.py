"""Rollouts: keyed per (prompt, sample, position), stop ids kept, truncation flagged, no graph.

Batch invariance on CPU float32: the sampled tokens of a prompt are the same alone or inside a
batch of 8; its recorded log-probs agree to ~5e-6, not bitwise, because the CPU BLAS does not
give a row the same floats for matmuls of different heights (measured: a [1, 64] @ [64, 96]
row differs from the same row of a [64, 64] @ [64, 96] product by ~3e-6). For a fixed batch
layout a rollout is bit-identical per key.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import rng
from tscale.errors import ShapeError
from tscale.models import Transformer, TransformerConfig, filter_logits, generate
from tscale.rl import Rollout, prompt_keys, sample_completions, sample_tokens

CONFIG = TransformerConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.2,  # peaked enough that continuations differ between prompts
    tie_word_embeddings=False,
)
MODEL = Transformer(CONFIG)
PARAMS = MODEL.init(rng.key(3))
PROMPTS = [
    [5, 9, 2, 33],
    [7],
    [40, 41, 42, 43, 44, 45, 46],
    [1, 1],
    [3, 4, 5],
    [8] * 5,
    [9],
    [10, 11],
]
PAD = 0


def _sample(prompts=PROMPTS, **kw) -> Rollout:
    args = {"num_samples": 4, "key": rng.key(0), "max_new_tokens": 8, "pad_id": PAD}
    return sample_completions(MODEL, PARAMS, prompts, **{**args, **kw})


def _assert_same(a: Rollout, b: Rollout) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampler_logps, b.sampler_logps)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.truncated, b.truncated)


def test_same_key_same_rollout_other_key_other_rollout() -> None:
    a, b = _sample(), _sample()
    _assert_same(a, b)
    assert a.num_completions == 32 and a.group.tolist() == [i // 4 for i in range(32)]
    c = _sample(key=rng.key(1))
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of a prompt differ from each other (their keys differ)
    rows = a.completions()
    assert all(len({tuple(r) for r in rows[4 * p : 4 * p + 4]}) > 1 for p in range(8))


def test_prompt_alone_equals_prompt_in_a_batch() -> None:
    batch = _sample(top_p=0.9)
    keys = prompt_keys(rng.key(0), len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        alone = _sample([prompt], key=keys[i : i + 1], top_p=0.9)
        rows = slice(4 * i, 4 * i + 4)
        assert alone.completions() == batch.completions()[rows]
        assert torch.equal(alone.truncated, batch.truncated[rows])
        torch.testing.assert_close(
            alone.sampler_logps, batch.sampler_logps[rows], atol=1e-5, rtol=0
        )
    # a subset in another order gets the same tokens too
    order = [6, 2, 0]
    subset = _sample([PROMPTS[i] for i in order], key=keys[order], top_p=0.9)
    want = [row for i in order for row in batch.completions()[4 * i : 4 * i + 4]]
    assert subset.completions() == want


def test_sample_g_does_not_depend_on_the_number_of_samples() -> None:
    four, two = _sample(), _sample(num_samples=2)
    want = [row for p in range(8) for row in four.completions()[4 * p : 4 * p + 2]]
    assert two.completions() == want


def test_stop_ids_are_kept_and_end_the_completion() -> None:
    free = _sample(max_new_tokens=10)
    assert free.truncated.all() and (free.lengths == 10).all()
    stops = sorted({row[2] for row in free.completions()[:6]})  # tokens some rows emit early
    out = _sample(max_new_tokens=10, stop_ids=stops)
    n_stopped = 0
    for row_free, row, n, trunc, ids, lps in zip(
        free.completions(),
        out.completions(),
        out.lengths.tolist(),
        out.truncated.tolist(),
        out.completion_ids,
        out.sampler_logps,
        strict=True,
    ):
        cut = next((i + 1 for i, t in enumerate(row_free) if t in stops), None)
        if cut is None:  # never stopped: all tokens, truncated
            assert row == row_free and n == 10 and trunc
        else:  # the stop id is the last token; padding (and log-prob 0) after it
            assert row == row_free[:cut] and n == cut and not trunc and row[-1] in stops
            assert (ids[cut:] == PAD).all() and (lps[cut:] == 0).all()
            n_stopped += 1
    assert 0 < n_stopped < out.num_completions
    # a stop id drawn as the very last token is a stop, not a truncation
    last = _sample(max_new_tokens=3, stop_ids=[free.completions()[0][2]])
    assert last.lengths[0] == 3 and not last.truncated[0]


def test_greedy_equals_generate() -> None:
    ours = _sample(num_samples=1, temperature=0.0, max_new_tokens=6)
    want = generate(MODEL, PARAMS, PROMPTS, max_new_tokens=6, pad_id=PAD)
    assert ours.completions() == want
    ours_g = _sample(num_samples=3, temperature=0.0, max_new_tokens=6)
    assert ours_g.completions() == [row for row in want for _ in range(3)]


def test_nothing_returned_carries_a_graph() -> None:
    params = PARAMS.clone().apply(lambda t: t.requires_grad_(True))
    out = sample_completions(
        MODEL, params, PROMPTS[:3], num_samples=2, key=rng.key(0), max_new_tokens=4, pad_id=PAD
    )
    for t in (out.completion_ids, out.sampler_logps, out.lengths, out.truncated, out.group):
        assert not t.requires_grad and t.grad_fn is None
    assert out.sampler_logps.dtype == torch.float32
    assert out.generation_seconds > 0


def test_keyed_draws_follow_the_filtered_softmax() -> None:
    """Gumbel-max with keyed uniforms samples softmax(filtered scores): 40k draws per case."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    keys = rng.split(rng.key(5), 40_000)
    for top_k, top_p in ((None, None), (2, None), (None, 0.8)):
        tokens, logps = sample_tokens(
            logits.expand(len(keys), 6), keys, temperature=0.7, top_k=top_k, top_p=top_p
        )
        probs = filter_logits(logits[None] / 0.7, top_k=top_k, top_p=top_p).softmax(-1)[0]
        freq = torch.bincount(tokens, minlength=6) / len(keys)
        torch.testing.assert_close(freq, probs, atol=0.008, rtol=0)
        # the recorded log-prob is the full softmax one, whatever was filtered
        full = (logits / 0.7).log_softmax(-1)
        assert torch.equal(logps, full[tokens])


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ShapeError, match="num_samples"):
        _sample(num_samples=0)
    with pytest.raises(ShapeError, match="prompt 1 is empty"):
        _sample([[1], []])
    with pytest.raises(ShapeError, match=r"one key per prompt \[2, 2\]"):
        _sample([[1], [2]], key=rng.split(rng.key(0), 3))
    with pytest.raises(ShapeError, match="max_new_tokens"):
        _sample(max_new_tokens=0)
    with pytest.raises(ShapeError, match="top_p must be in"):
        _sample(top_p=0.0)
    with pytest.raises(ShapeError, match="top_k must be"):
        _sample(top_k=0)
    with pytest.raises(ShapeError, match="temperature"):
        _sample(temperature=-1.0)
    assert _sample([]).num_completions == 0


class _OpaqueCache:
    """A model whose cache is not a TensorDict: the prompts are then prefilled once per row."""

    def apply(self, params, batch, **kw):
        return MODEL.apply(params, batch, **kw)

    def init_cache(self, batch_size, max_length, **kw):
        return (MODEL.init_cache(batch_size, max_length, **kw),)

    def apply_with_cache(self, params, batch, cache, offset, **kw):
        logits, inner = MODEL.apply_with_cache(params, batch, cache[0], offset, **kw)
        return logits, (inner,)


def test_shared_prefill_equals_one_prefill_per_row() -> None:
    shared = _sample(top_k=20)
    per_row = sample_completions(
        _OpaqueCache(), PARAMS, PROMPTS, num_samples=4, key=rng.key(0), max_new_tokens=8,
        pad_id=PAD, top_k=20,
    )  # fmt: skip
    assert shared.completions() == per_row.completions()
    torch.testing.assert_close(shared.sampler_logps, per_row.sampler_logps, atol=1e-5, rtol=0)


@settings(max_examples=8, deadline=None)
@given(
    subset=st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**31),
)
def test_any_subset_samples_what_the_whole_batch_samples(subset: list[int], seed: int) -> None:
    keys = prompt_keys(rng.key(seed), len(PROMPTS))
    whole = _sample(key=rng.key(seed), num_samples=2, max_new_tokens=5)
    part = _sample([PROMPTS[i] for i in subset], key=keys[subset], num_samples=2, max_new_tokens=5)
    assert part.completions() == [r for i in subset for r in whole.completions()[2 * i : 2 * i + 2]]


@pytest.mark.parametrize("stops", [[3, 17, 29], [5]])
def test_dropping_finished_rows_samples_what_decoding_every_row_samples(
    stops: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finished rows leave the decoding batch and its cache (``COMPACT_BELOW``): the tokens,
    lengths and truncation flags are those of decoding every row to the end, the log-probs
    agree to the batch-height rounding (module docstring)."""
    import tscale.rl.rollout as rollout

    kw = {"stop_ids": stops, "max_new_tokens": 12, "top_p": 0.95}
    compacted = _sample(**kw)
    monkeypatch.setattr(rollout, "COMPACT_BELOW", 0.0)  # never: every row decoded to the end
    every_row = _sample(**kw)
    assert compacted.completions() == every_row.completions()
    assert torch.equal(compacted.completion_ids, every_row.completion_ids)
    assert torch.equal(compacted.lengths, every_row.lengths)
    assert torch.equal(compacted.truncated, every_row.truncated)
    torch.testing.assert_close(compacted.sampler_logps, every_row.sampler_logps, atol=1e-5, rtol=0)
    assert (compacted.lengths < 12).any() and (compacted.lengths > 1).any()  # rows end apart


class _Spy:
    """The test model, recording the height of every cached forward."""

    def __init__(self) -> None:
        self.heights: list[int] = []

    def init_cache(self, *args, **kw):
        return MODEL.init_cache(*args, **kw)

    def apply_with_cache(self, params, batch, cache, offset, **kw):
        self.heights.append(int(batch["input_ids"].shape[0]))
        return MODEL.apply_with_cache(params, batch, cache, offset, **kw)


def test_finished_rows_leave_the_decoding_batch() -> None:
    """Once most rows have stopped the decoding batch shrinks, never below the running rows."""
    spy = _Spy()
    out = sample_completions(
        spy, PARAMS, PROMPTS, num_samples=4, key=rng.key(0), max_new_tokens=12, pad_id=PAD,
        stop_ids=list(range(0, 61, 2)),
    )  # fmt: skip
    assert spy.heights[0] == len(PROMPTS)  # the shared prefill
    decoded = spy.heights[1:]
    assert decoded and min(decoded) < len(PROMPTS) * 4  # finished rows left the batch
    assert all(b <= a for a, b in itertools.pairwise(decoded))
    running = [int((out.lengths > t + 1).sum()) for t in range(len(decoded))]
    assert all(h >= r for h, r in zip(decoded, running, strict=True))
