"""The Llama-style model against ``transformers.LlamaForCausalLM``: logits, gradients, packing."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.core import rng
from tscale.core import tree as T
from tscale.errors import ShapeError
from tscale.models import (
    Transformer,
    TransformerConfig,
    apply,
    hidden_states,
    init,
    logits_from_hidden,
    param_shapes,
)
from tscale.testing import assert_trees_equal

transformers.logging.set_verbosity_error()


BASE = TransformerConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    init_std=0.05,
)
GQA_UNTIED = BASE
GQA_TIED = attrs.evolve(BASE, tie_word_embeddings=True)
MHA_UNTIED = attrs.evolve(BASE, num_kv_heads=4)
MHA_TIED_HEADDIM = attrs.evolve(BASE, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
CONFIGS = {
    "gqa-untied": GQA_UNTIED,
    "gqa-tied": GQA_TIED,
    "mha-untied": MHA_UNTIED,
    "mqa-tied-headdim8": MHA_TIED_HEADDIM,
}


def hf_model(
    config: TransformerConfig, params: TensorDict, attn: str = "sdpa"
) -> transformers.LlamaForCausalLM:
    """An HF model holding ``params``, loaded strictly (``lm_head`` missing only when tied)."""
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation=attn)
    model = transformers.LlamaForCausalLM(hf_config).to(config.dtype)
    flat = {k: v.clone() for k, v in T.flatten(params).items()}
    if config.tie_word_embeddings:
        result = model.load_state_dict(flat, strict=False)
        assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model.load_state_dict(flat, strict=True)
    return model.eval()


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- logits vs HF


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_match_hf(name: str, explicit_positions: bool) -> None:
    config = CONFIGS[name]
    params = init(config, rng.key(1))
    attn = "eager" if name == "mha-untied" else "sdpa"
    model = hf_model(config, params, attn)
    ids = tokens(3, 11, config.vocab_size)
    batch = {"input_ids": ids}
    hf_kwargs = {}
    if explicit_positions:
        # Gapped, per-row positions. RoPE is relative, so only uneven gaps change the logits; the
        # explicit all-ones mask stops HF from reading the gaps as packed-sequence boundaries.
        gaps = torch.randint(1, 4, (3, 11), generator=torch.Generator().manual_seed(1))
        pos = gaps.cumsum(-1) - gaps[:, :1]
        batch["position_ids"] = hf_kwargs["position_ids"] = pos
        hf_kwargs["attention_mask"] = torch.ones_like(ids)
    ours = apply(config, params, batch)
    with torch.no_grad():
        theirs = model(ids, **hf_kwargs).logits
    assert ours.shape == (3, 11, config.vocab_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_positions_default_to_arange_and_are_relative() -> None:
    params = init(BASE, rng.key(2))
    ids = tokens(2, 9, BASE.vocab_size)
    plain = apply(BASE, params, {"input_ids": ids})
    arange = apply(BASE, params, {"input_ids": ids, "position_ids": torch.arange(9).expand(2, 9)})
    shifted = apply(BASE, params, {"input_ids": ids, "position_ids": torch.arange(9)[None] + 5})
    spread = apply(BASE, params, {"input_ids": ids, "position_ids": 2 * torch.arange(9)[None]})
    torch.testing.assert_close(plain, arange, atol=0, rtol=0)
    torch.testing.assert_close(plain, shifted, atol=1e-5, rtol=0)  # RoPE sees offsets only
    assert (plain - spread).abs().max() > 1e-3


def test_bfloat16_matches_hf() -> None:
    config = attrs.evolve(BASE, dtype=torch.bfloat16)
    params = init(config, rng.key(3))
    assert all(t.dtype == torch.bfloat16 for t in T.leaves(params))
    model = hf_model(config, params)
    ids = tokens(2, 10, config.vocab_size)
    ours = apply(config, params, {"input_ids": ids})
    with torch.no_grad():
        theirs = model(ids).logits
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=0)


def test_batch_as_tensordict_and_hidden_split() -> None:
    params = init(GQA_TIED, rng.key(4))
    ids = tokens(2, 8, GQA_TIED.vocab_size)
    model = Transformer(GQA_TIED)
    td = TensorDict({"input_ids": ids}, batch_size=[2])
    logits = model.apply(params, td)
    h = hidden_states(GQA_TIED, params, {"input_ids": ids})
    assert h.shape == (2, 8, GQA_TIED.hidden_size)
    torch.testing.assert_close(logits, logits_from_hidden(GQA_TIED, params, h), atol=0, rtol=0)
    h_td = model.hidden_states(params, td)
    torch.testing.assert_close(logits, model.logits_from_hidden(params, h_td), atol=0, rtol=0)


# ---------------------------------------------------------------- document masking


def _packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return doc_ids, pos


@pytest.mark.parametrize("lengths", [[5, 7], [4, 1, 6]])
def test_packed_documents_equal_separate_runs(lengths: list[int]) -> None:
    params = init(GQA_UNTIED, rng.key(5))
    ids = tokens(1, sum(lengths), GQA_UNTIED.vocab_size, seed=len(lengths))
    doc_ids, pos = _packed(lengths)
    packed = apply(GQA_UNTIED, params, {"input_ids": ids, "position_ids": pos, "doc_ids": doc_ids})
    start = 0
    for n in lengths:
        alone = apply(GQA_UNTIED, params, {"input_ids": ids[:, start : start + n]})
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=0)
        start += n


def test_packed_documents_match_hf_packed_positions() -> None:
    """HF reads restarting position_ids as packed sequences; our doc_ids must agree with it."""
    params = init(GQA_TIED, rng.key(5))
    doc_ids, pos = _packed([6, 3, 5])
    ids = tokens(1, 14, GQA_TIED.vocab_size)
    ours = apply(GQA_TIED, params, {"input_ids": ids, "position_ids": pos, "doc_ids": doc_ids})
    with torch.no_grad():
        # HF only detects packing without a KV cache (use_cache=True silently turns it off).
        theirs = hf_model(GQA_TIED, params)(ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_packing_property(lengths: list[int], seed: int) -> None:
    """Any packing of documents gives each document the logits it has alone."""
    params = init(MHA_TIED_HEADDIM, rng.key(6))
    ids = tokens(1, sum(lengths), MHA_TIED_HEADDIM.vocab_size, seed=seed)
    doc_ids, pos = _packed(lengths)
    batch = {"input_ids": ids, "position_ids": pos, "doc_ids": doc_ids + seed}  # any labels work
    packed = apply(MHA_TIED_HEADDIM, params, batch)
    start = 0
    for n in lengths:
        alone = apply(MHA_TIED_HEADDIM, params, {"input_ids": ids[:, start : start + n]})
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=0)
        start += n


def test_single_document_mask_equals_causal() -> None:
    params = init(GQA_UNTIED, rng.key(7))
    ids = tokens(2, 10, GQA_UNTIED.vocab_size)
    causal = apply(GQA_UNTIED, params, {"input_ids": ids})
    masked = apply(GQA_UNTIED, params, {"input_ids": ids, "doc_ids": torch.ones_like(ids)})
    torch.testing.assert_close(masked, causal, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- gradients and purity


def _loss(config: TransformerConfig, params: TensorDict, batch: dict) -> torch.Tensor:
    logits = apply(config, params, batch)
    ids = batch["input_ids"]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1), reduction="sum"
    )


@pytest.mark.parametrize("name", ["gqa-untied", "gqa-tied"])
def test_grad_and_value_matches_hf_autograd(name: str) -> None:
    config = CONFIGS[name]
    params = init(config, rng.key(8))
    ids = tokens(2, 12, config.vocab_size)
    grads, value = torch.func.grad_and_value(lambda p: _loss(config, p, {"input_ids": ids}))(params)

    model = hf_model(config, params)
    logits = model(ids).logits
    hf_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1), reduction="sum"
    )
    hf_loss.backward()
    torch.testing.assert_close(value, hf_loss.detach(), atol=1e-4, rtol=1e-5)

    hf_grads = {k: p.grad for k, p in model.named_parameters()}
    assert T.leaf_keys(grads) == T.leaf_keys(params)
    for key, g in T.flatten(grads).items():
        ref = hf_grads[key]
        err = (g - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, f"{key}: relative error {err:.2e}"


def test_grad_with_doc_mask_and_locked_params_is_pure() -> None:
    params = init(GQA_UNTIED, rng.key(9)).lock_()
    before = T.clone(params)
    ids = tokens(2, 10, GQA_UNTIED.vocab_size)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    batch = {"input_ids": ids, "doc_ids": doc_ids}
    grads, value = torch.func.grad_and_value(lambda p: _loss(GQA_UNTIED, p, batch))(params)
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in T.leaves(grads))
    assert_trees_equal(params, before)  # no in-place change of the params


# ---------------------------------------------------------------- init and config


def test_init_names_and_shapes_match_hf_checkpoint() -> None:
    for config in CONFIGS.values():
        params = init(config, rng.key(0))
        hf_state = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**config.to_hf_dict())
        ).state_dict()
        expected = {k: tuple(v.shape) for k, v in hf_state.items()}
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]
        ours = {k: tuple(v.shape) for k, v in T.flatten(params).items()}
        assert ours == expected
        assert list(ours) == list(param_shapes(config))
        assert params.batch_size == torch.Size([])
        n_hf = sum(
            p.numel()
            for p in transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**config.to_hf_dict())
            ).parameters()
        )
        assert Transformer(config).num_params(params) == Transformer(config).num_params() == n_hf


def test_init_is_deterministic_from_key() -> None:
    a = init(BASE, rng.key(11))
    b = Transformer(BASE).init(rng.key(11))
    c = init(BASE, rng.key(12))
    assert_trees_equal(a, b)
    for k, x in T.flatten(a).items():
        y = T.flatten(c)[k]
        if k.endswith("norm.weight"):
            assert torch.equal(x, torch.ones_like(x))
        else:
            assert not torch.equal(x, y), k
            assert abs(x.std().item() - BASE.init_std) < 0.2 * BASE.init_std, k
    low = init(attrs.evolve(BASE, dtype=torch.bfloat16), rng.key(11))
    assert_trees_equal(low, a.apply(lambda t: t.to(torch.bfloat16)))


def test_config_defaults_and_hf_dict() -> None:
    config = TransformerConfig(
        vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4
    )
    assert config.num_kv_heads == 4 and config.head_dim == 8
    hf = transformers.LlamaConfig(**config.to_hf_dict())
    assert hf.num_key_value_heads == 4 and hf.head_dim == 8 and hf.num_hidden_layers == 1
    assert hf.rope_parameters["rope_theta"] == config.rope_theta
    assert hf.tie_word_embeddings == config.tie_word_embeddings


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"hidden_size": 30, "num_heads": 4}, ["num_heads=4", "hidden_size=30"]),
        ({"num_heads": 4, "num_kv_heads": 3}, ["num_kv_heads=3", "num_heads=4"]),
        ({"num_heads": 4, "head_dim": 7}, ["head_dim=7", "even"]),
        ({"num_layers": 0}, ["num_layers", "positive"]),
        ({"vocab_size": 3.5}, ["vocab_size", "positive int"]),
        ({"rms_norm_eps": 0.0}, ["rms_norm_eps"]),
        ({"dtype": torch.int64}, ["dtype", "float"]),
    ],
)
def test_config_validation_errors(changes: dict, words: list[str]) -> None:
    kwargs = {
        "vocab_size": 10,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 1,
        "num_heads": 4,
        **changes,
    }
    with pytest.raises(ShapeError) as info:
        TransformerConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_batch_validation_errors() -> None:
    params = init(BASE, rng.key(0))
    with pytest.raises(ShapeError, match="input_ids"):
        apply(BASE, params, {"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ShapeError, match="input_ids"):
        apply(BASE, params, {"input_ids": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ShapeError, match="position_ids"):
        apply(
            BASE,
            params,
            {
                "input_ids": torch.zeros(2, 3, dtype=torch.int64),
                "position_ids": torch.zeros(3, 3, dtype=torch.int64),
            },
        )
    with pytest.raises(ShapeError, match="doc_ids"):
        apply(
            BASE,
            params,
            {
                "input_ids": torch.zeros(2, 3, dtype=torch.int64),
                "doc_ids": torch.zeros(2, 4, dtype=torch.int64),
            },
        )


# ---------------------------------------------------------------- families


FAMILY_CONFIGS = {
    "mistral": attrs.evolve(BASE, family="mistral", sliding_window=3),
    "qwen2": attrs.evolve(
        BASE,
        family="qwen2",
        qkv_bias=None,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention"],
    ),
    "qwen3": attrs.evolve(BASE, family="qwen3", head_dim=24),
    "gemma": attrs.evolve(BASE, family="gemma", hidden_act=None, head_dim=32),
    "gemma2": attrs.evolve(
        BASE,
        family="gemma2",
        hidden_act=None,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16.0,
        attn_logit_softcap=1.5,
        final_logit_softcap=4.0,
    ),
    "phi3": attrs.evolve(BASE, family="phi3", partial_rotary_factor=0.5, sliding_window=4),
}
HF_CLASSES = {
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "gemma": transformers.GemmaForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "phi3": transformers.Phi3ForCausalLM,
}


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_family_init_names_shapes_and_logits_match_hf(name: str) -> None:
    config = FAMILY_CONFIGS[name]
    params = init(config, rng.key(0))
    cls = HF_CLASSES[name]
    hf_config = cls.config_class(**config.to_hf_dict(), pad_token_id=0)
    hf = cls(hf_config).eval()
    hf.config._attn_implementation = "eager"
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in T.flatten(params).items()}
    assert ours == expected  # (none of these is tied)
    norms = [t for k, t in T.flatten(params).items() if k.endswith("norm.weight")]
    identity = 0.0 if name.startswith("gemma") else 1.0
    assert all(bool((t == identity).all()) for t in norms)
    hf.load_state_dict({k: v.clone() for k, v in T.flatten(params).items()}, strict=True)
    ids = tokens(2, 10, config.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(apply(config, params, {"input_ids": ids}), theirs, atol=1e-4, rtol=0)


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(["mistral", "gemma2", "phi3"]),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_sliding_window_packing_property(name: str, lengths: list[int], seed: int) -> None:
    """With a sliding window too, a packed document gets the logits it has alone."""
    config = FAMILY_CONFIGS[name]
    params = init(config, rng.key(6))
    ids = tokens(1, sum(lengths), config.vocab_size, seed=seed)
    doc_ids, pos = _packed(lengths)
    packed = apply(config, params, {"input_ids": ids, "position_ids": pos, "doc_ids": doc_ids})
    start = 0
    for n in lengths:
        alone = apply(config, params, {"input_ids": ids[:, start : start + n]})
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=0)
        start += n


def test_sliding_window_limits_attention_distance() -> None:
    """A token's logits depend on the last ``sliding_window`` tokens only (one sliding layer)."""
    config = attrs.evolve(FAMILY_CONFIGS["mistral"], num_layers=1)
    params = init(config, rng.key(7))
    ids = tokens(1, 8, config.vocab_size)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % config.vocab_size
    a = apply(config, params, {"input_ids": ids})
    b = apply(config, params, {"input_ids": changed})
    diff = (a - b).abs().amax(-1)[0]
    assert bool((diff[:3] > 1e-4).all()) and bool((diff[3:] == 0).all())


def test_rope_scaling_llama3_matches_hf_inv_freq() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tscale.models import RopeScaling
    from tscale.models.transformer import _inv_freq

    scaling = RopeScaling(
        rope_type="llama3", factor=8.0, original_max_position_embeddings=64, high_freq_factor=4.0
    )
    config = attrs.evolve(BASE, rope_scaling=scaling, head_dim=64, num_kv_heads=2)
    hf = transformers.LlamaConfig(**config.to_hf_dict())
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert scale == 1.0
    torch.testing.assert_close(_inv_freq(config, torch.device("cpu")), theirs, atol=0, rtol=0)
