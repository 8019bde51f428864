"""Generation: left padding is invisible, the KV cache changes nothing, sampling is reproducible.

Greedy tokens equal ``transformers`` generate; per-family comparisons live in test_families.py.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import rng
from tscale.core import tree as T
from tscale.errors import ShapeError
from tscale.models import (
    Transformer,
    TransformerConfig,
    apply,
    apply_with_cache,
    filter_logits,
    generate,
    greedy,
    init,
    init_cache,
)

transformers.logging.set_verbosity_error()


CONFIG = TransformerConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.2,  # large enough that greedy continuations vary instead of repeating
    tie_word_embeddings=False,
)
MODEL = Transformer(CONFIG)
PARAMS = MODEL.init(rng.key(3))
PROMPTS = [[5, 9, 2, 33], [7], [40, 41, 42, 43, 44, 45, 46], [1, 1]]
PAD = 0
NEVER = -1  # an eos id no model emits


def hf_generate(prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """New tokens of HF greedy generation (KV cache, left-padded batch), each cut at eos."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG.to_hf_dict()))
    model.load_state_dict(T.flatten(PARAMS), strict=True)
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=PAD,
        )
    rows = [row[width:] for row in out.tolist()]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def test_left_padded_batch_equals_each_prompt_alone() -> None:
    batched = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=8, eos_id=NEVER, pad_id=PAD)
    alone = [
        greedy(MODEL.apply, PARAMS, [p], max_new_tokens=8, eos_id=NEVER, pad_id=PAD)[0]
        for p in PROMPTS
    ]
    assert batched == alone
    assert all(len(row) == 8 for row in batched)


def test_pad_id_value_does_not_matter() -> None:
    a = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=5, eos_id=NEVER, pad_id=0)
    b = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=5, eos_id=NEVER, pad_id=37)
    assert a == b


def test_equals_transformers_generate() -> None:
    ours = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=NEVER, pad_id=PAD)
    never = CONFIG.vocab_size + 1
    for prompt, row in zip(PROMPTS, ours, strict=True):
        assert [row] == hf_generate([prompt], 10, eos_id=never)
    assert ours == hf_generate(PROMPTS, 10, eos_id=never)  # HF's own left padding agrees
    assert len({tuple(r) for r in ours}) > 1  # the prompts lead to different continuations


def test_stops_at_eos_and_excludes_it() -> None:
    free = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=None, pad_id=PAD)
    eos = free[0][3]  # a token the first prompt emits (at step 4 or earlier)
    stopped = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=PAD)
    for row_free, row in zip(free, stopped, strict=True):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row == row_free[:cut]
        assert eos not in row
    assert 0 < len(stopped[0]) < 10 and any(len(row) == 10 for row in stopped)
    assert stopped == hf_generate(PROMPTS, 10, eos_id=eos)


def test_edge_cases() -> None:
    assert greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=0, eos_id=1, pad_id=PAD) == [
        [] for _ in PROMPTS
    ]
    assert greedy(MODEL.apply, PARAMS, [], max_new_tokens=3, eos_id=1, pad_id=PAD) == []
    with pytest.raises(ShapeError, match="prompt 1 is empty"):
        greedy(MODEL.apply, PARAMS, [[1], []], max_new_tokens=3, eos_id=1, pad_id=PAD)
    with pytest.raises(ShapeError, match="max_new_tokens"):
        greedy(MODEL.apply, PARAMS, [[1]], max_new_tokens=-1, eos_id=1, pad_id=PAD)


# ---------------------------------------------------------------- KV cache

# Families whose attention differs (sliding windows, soft-caps, fused weights, q/k norms).
CACHE_CONFIGS = {
    "llama": CONFIG,
    "mistral-window3": attrs.evolve(CONFIG, family="mistral", sliding_window=3),
    "gemma2-window3-caps": attrs.evolve(
        CONFIG,
        family="gemma2",
        hidden_act=None,
        num_layers=3,
        head_dim=24,
        sliding_window=3,
        query_pre_attn_scalar=20.0,
        attn_logit_softcap=2.0,
        final_logit_softcap=5.0,
        tie_word_embeddings=True,
    ),
    "qwen3": attrs.evolve(CONFIG, family="qwen3"),
    "phi3-partial": attrs.evolve(CONFIG, family="phi3", partial_rotary_factor=0.5),
}


def _left_padded(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    width = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab_size, (len(lengths), width), generator=g)
    col = torch.arange(width)[None]
    pads = torch.tensor([width - n for n in lengths])[:, None]
    return {
        "input_ids": ids,
        "position_ids": (col - pads).clamp_min(0),
        "doc_ids": (col >= pads).long(),
    }


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_decoding_equals_full_forward(name: str) -> None:
    """Prefill + one token at a time against the cache gives the no-cache logits (<= 1e-5)."""
    config = CACHE_CONFIGS[name]
    params = init(config, rng.key(4))
    batch = _left_padded([9, 4, 7])
    full = apply(config, params, batch)
    width = batch["input_ids"].shape[1]
    for prefill in (width, 3, 1):
        cache = init_cache(config, 3, width + 2)
        part = {k: v[:, :prefill] for k, v in batch.items()}
        logits, cache = apply_with_cache(config, params, part, cache, 0)
        pieces = [logits]
        for t in range(prefill, width):
            step = {k: v[:, t : t + 1] for k, v in batch.items()}
            logits, cache = apply_with_cache(config, params, step, cache, t)
            pieces.append(logits)
        cached = torch.cat(pieces, dim=1)
        real = batch["doc_ids"].bool()  # pad positions may differ (they see other pads)
        assert (cached - full)[real].abs().max() <= 1e-5, (name, prefill)


def test_cache_shapes_and_errors() -> None:
    cache = MODEL.init_cache(2, 10)
    nkv, hd = CONFIG.num_kv_heads, CONFIG.head_dim
    assert cache["k"].shape == (CONFIG.num_layers, 2, nkv, 10, hd)
    assert cache["doc_ids"].shape == (2, 10) and bool((cache["doc_ids"] == -1).all())
    ids = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(ShapeError, match="do not fit a cache of 2 rows x 10 slots"):
        MODEL.apply_with_cache(PARAMS, {"input_ids": ids}, cache, 8)
    with pytest.raises(ShapeError, match="3 rows"):
        MODEL.apply_with_cache(PARAMS, {"input_ids": torch.ones(3, 1, dtype=torch.int64)}, cache, 0)


class _Spy:
    """A cached model that counts its calls."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.calls = model, {"apply": 0, "apply_with_cache": 0}

    def apply(self, params: Any, batch: Any) -> torch.Tensor:
        self.calls["apply"] += 1
        return self.model.apply(params, batch)

    def init_cache(self, batch_size: int, max_length: int, **kw: Any) -> Any:
        return self.model.init_cache(batch_size, max_length, **kw)

    def apply_with_cache(self, params: Any, batch: Any, cache: Any, offset: int) -> Any:
        self.calls["apply_with_cache"] += 1
        return self.model.apply_with_cache(params, batch, cache, offset)


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_generate_with_cache_equals_without(name: str) -> None:
    model = Transformer(CACHE_CONFIGS[name])
    params = model.init(rng.key(5))
    kw: dict[str, Any] = {"max_new_tokens": 12, "pad_id": PAD}
    spy = _Spy(model)
    cached = generate(spy, params, PROMPTS, **kw)
    assert spy.calls == {"apply": 0, "apply_with_cache": 12}  # one prefill, 11 single tokens
    assert cached == generate(model.apply, params, PROMPTS, use_cache=False, **kw)
    sample = {**kw, "temperature": 0.8, "top_k": 20, "key": rng.key(1)}
    assert generate(model, params, PROMPTS, **sample) == generate(
        model.apply, params, PROMPTS, use_cache=False, **sample
    )


def test_greedy_with_a_bound_apply_uses_the_cache() -> None:
    spy = _Spy(MODEL)
    out = greedy(spy.apply, PARAMS, PROMPTS, max_new_tokens=6, eos_id=NEVER, pad_id=PAD)
    assert spy.calls["apply_with_cache"] == 6 and spy.calls["apply"] == 0
    plain = greedy(
        lambda p, b: MODEL.apply(p, b), PARAMS, PROMPTS, max_new_tokens=6, eos_id=NEVER, pad_id=PAD
    )
    assert out == plain


# ---------------------------------------------------------------- sampling


def test_sampling_is_reproducible_from_the_key() -> None:
    kw: dict[str, Any] = {"max_new_tokens": 15, "pad_id": PAD, "temperature": 1.0}
    a = generate(MODEL, PARAMS, PROMPTS, key=rng.key(7), **kw)
    b = generate(MODEL, PARAMS, PROMPTS, key=rng.key(7), **kw)
    c = generate(MODEL, PARAMS, PROMPTS, key=rng.key(8), **kw)
    assert a == b and a != c
    assert a != generate(MODEL, PARAMS, PROMPTS, max_new_tokens=15, pad_id=PAD)  # not greedy
    # A tiny temperature is greedy in effect.
    cold = generate(MODEL, PARAMS, PROMPTS, key=rng.key(7), **{**kw, "temperature": 1e-4})
    assert cold == generate(MODEL, PARAMS, PROMPTS, max_new_tokens=15, pad_id=PAD)


def _rank_mass(logits: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many tokens score strictly higher than ``token``, and their probability mass."""
    chosen = logits.gather(-1, token[:, None])
    above = logits > chosen
    probs = logits.softmax(-1)
    return above.sum(-1), (probs * above).sum(-1)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    top_k=st.one_of(st.none(), st.integers(1, 12)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
    temperature=st.floats(0.3, 3.0),
)
def test_samples_stay_in_top_k_and_nucleus(
    seed: int, top_k: int | None, top_p: float | None, temperature: float
) -> None:
    """Sampled tokens always lie in the top-k set and in the nucleus (mass above them < top_p)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 30, generator=g) * 3
    scaled = logits / temperature
    kept = filter_logits(scaled, top_k=top_k, top_p=top_p)
    probs = kept.softmax(-1)
    token = torch.multinomial(probs, 1, replacement=True, generator=g)[:, 0]
    rank, mass = _rank_mass(scaled, token)
    if top_k is not None:
        assert bool((rank < top_k).all())
    if top_p is not None:
        assert bool((mass < top_p + 1e-6).all())
    best = scaled.argmax(-1)
    assert bool(torch.isfinite(kept.gather(-1, best[:, None])).all())  # the best one always stays


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), top_k=st.integers(1, 4), top_p=st.floats(0.1, 0.9))
def test_generated_tokens_respect_top_k_and_top_p(seed: int, top_k: int, top_p: float) -> None:
    """End to end: each sampled token is within top-k and the nucleus of the model's logits."""
    temperature = 1.5
    for k, p in ((top_k, None), (None, top_p)):
        out = generate(
            MODEL,
            PARAMS,
            PROMPTS,
            max_new_tokens=6,
            pad_id=PAD,
            temperature=temperature,
            top_k=k,
            top_p=p,
            key=rng.key(seed),
        )
        for prompt, new in zip(PROMPTS, out, strict=True):
            seq = torch.tensor([prompt + new])
            logits = MODEL.apply(PARAMS, {"input_ids": seq})[0, len(prompt) - 1 : -1]
            rank, mass = _rank_mass(logits.double() / temperature, torch.tensor(new))
            if k is not None:
                assert bool((rank < k).all())
            if p is not None:
                assert bool((mass < p + 1e-5).all())


def test_stop_tokens() -> None:
    free = generate(MODEL, PARAMS, PROMPTS, max_new_tokens=10, pad_id=PAD)
    stops = (free[0][2], free[1][4])
    stopped = generate(MODEL, PARAMS, PROMPTS, max_new_tokens=10, pad_id=PAD, stop_tokens=stops)
    for row_free, row in zip(free, stopped, strict=True):
        cut = next((i for i, t in enumerate(row_free) if t in stops), len(row_free))
        assert row == row_free[:cut]
    assert len(stopped[0]) <= 2 and len(stopped[1]) <= 4


def test_sampling_argument_errors() -> None:
    kw: dict[str, Any] = {"max_new_tokens": 2, "pad_id": PAD}
    with pytest.raises(ShapeError, match="needs a key"):
        generate(MODEL, PARAMS, PROMPTS, temperature=1.0, **kw)
    with pytest.raises(ShapeError, match="temperature"):
        generate(MODEL, PARAMS, PROMPTS, temperature=-1.0, **kw)
    with pytest.raises(ShapeError, match="top_k"):
        generate(MODEL, PARAMS, PROMPTS, top_k=0, **kw)
    with pytest.raises(ShapeError, match="top_p"):
        generate(MODEL, PARAMS, PROMPTS, top_p=1.5, **kw)
    assert T.leaf_keys(PARAMS)  # params untouched by generation
