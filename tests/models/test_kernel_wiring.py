"""The model through the kernels: ``attention_backend`` / ``norm_backend`` compute the same model.

On CPU the kernels take their PyTorch paths (``attention``: SDPA with the kernel's own masks, or
its explicit softmax under a soft-cap; ``rms_norm``: its reference), so these tests check the
wiring: documents, per-layer windows, soft-caps, the score scale and GQA reach the kernel and the
result is the default path's, in values and gradients. One test forces the Triton kernels under
Triton's interpreter (see ``tests/kernels/conftest.py`` for why ``triton`` is imported here with
``TRITON_INTERPRET`` unset and the variable is set per test).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import attrs
import pytest
import torch
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.errors import ConfigError
from tscale.kernels import cross_entropy, flash_attention, rmsnorm
from tscale.losses import make_fused_lm_loss, make_lm_loss
from tscale.models.transformer import (
    FULL,
    SLIDING,
    Transformer,
    TransformerConfig,
    apply,
    apply_with_cache,
    head_weight,
    init_cache,
    logits_from_hidden,
)
from tscale.testing import assert_trees_close

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    _outer = os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401 - imported in compiled mode, as tests/kernels/conftest.py
    finally:
        if _outer is not None:
            os.environ["TRITON_INTERPRET"] = _outer

VOCAB = 61
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,  # GQA; head_dim 16 (a Triton head dim)
    "max_position_embeddings": 64,
}
CONFIGS: dict[str, TransformerConfig] = {
    "llama-gqa": TransformerConfig(**BASE),
    "llama-mha-tied": TransformerConfig(**{**BASE, "num_kv_heads": 4, "tie_word_embeddings": True}),
    "mistral-window": TransformerConfig(**BASE, family="mistral", sliding_window=4),
    "qwen2-window-top": TransformerConfig(
        **BASE, family="qwen2", sliding_window=3, layer_types=(FULL, SLIDING)
    ),
    "qwen3-qknorm": TransformerConfig(**BASE, family="qwen3"),
    "gemma2-softcaps": TransformerConfig(
        **BASE,
        family="gemma2",
        sliding_window=4,
        layer_types=(SLIDING, FULL),
        query_pre_attn_scalar=24.0,
        attn_logit_softcap=0.05,
        final_logit_softcap=0.5,
        tie_word_embeddings=True,
    ),
}
KERNEL_SWITCHES = {"attention_backend": "torch", "norm_backend": "auto"}


def _params(config: TransformerConfig, seed: int = 0) -> TensorDict:
    """Random params with every norm weight and bias perturbed, so each one shows in the output."""
    params = Transformer(config).init(R.key(seed))
    g = torch.Generator().manual_seed(seed + 1)
    flat = {
        name: t + 0.3 * torch.randn(t.shape, generator=g) if t.dim() == 1 else t
        for name, t in T.flatten(params).items()
    }
    return T.unflatten(flat)


def _batch(packed: bool, b: int = 2, s: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[torch.rand(b, s, generator=g) < 0.25] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        lengths = [[5, 4, 3], [7, 5]]
        doc_ids = torch.cat(
            [
                torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None]
                for row in lengths[:b]
            ]
        )
        pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths[:b]])
        batch |= {"doc_ids": doc_ids, "position_ids": pos}
    return batch


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("switches", [KERNEL_SWITCHES, {"attention_backend": "auto"}])
def test_kernel_path_logits_equal_default(name, packed, switches):
    config = CONFIGS[name]
    params, batch = _params(config), _batch(packed)
    expected = apply(config, params, batch)
    got = apply(attrs.evolve(config, **switches), params, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_documents_are_isolated_on_the_kernel_path():
    """Each packed document gets the logits it gets alone (so doc_ids reach the kernel)."""
    config = attrs.evolve(CONFIGS["mistral-window"], **KERNEL_SWITCHES)
    params, batch = _params(config), _batch(True, b=1)
    packed = apply(config, params, batch)
    start = 0
    for n in (5, 4, 3):
        alone = apply(config, params, {"input_ids": batch["input_ids"][:, start : start + n]})
        torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "gemma2-softcaps"])
def test_kernel_path_gradients_equal_default(name):
    config = CONFIGS[name]
    params, batch = _params(config), _batch(True)
    fast = attrs.evolve(config, **KERNEL_SWITCHES)

    def loss(cfg):
        return make_lm_loss(lambda p, b: apply(cfg, p, b))

    (l0, _), g0 = value_and_grad(loss(config))(params, batch)
    (l1, _), g1 = value_and_grad(loss(fast))(params, batch)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert_trees_close(g1, g0, rtol=1e-5, atol=1e-5)

    # torch.func's engine (the one under vmap / torch.compile) through the kernels' Functions.
    def flat_loss(cfg):
        def fn(p):
            return loss(cfg)(p, batch)[0]

        return fn

    g2 = torch.func.grad(flat_loss(fast))(params)
    assert_trees_close(g2, g0, rtol=1e-5, atol=1e-5)


def test_cache_path_keeps_sdpa_and_matches_apply():
    """Prefill and token-by-token decoding with kernel switches give the kernel forward's logits."""
    config = attrs.evolve(CONFIGS["qwen2-window-top"], **KERNEL_SWITCHES)
    params, batch = _params(config), _batch(False, b=2, s=8)
    full = apply(config, params, batch)
    cache = init_cache(config, 2, 8)
    got, cache = apply_with_cache(
        config, params, {"input_ids": batch["input_ids"][:, :5]}, cache, 0
    )
    for t in range(5, 8):
        step, cache = apply_with_cache(
            config, params, {"input_ids": batch["input_ids"][:, t : t + 1]}, cache, t
        )
        got = torch.cat([got, step], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_head_weight_is_what_logits_from_hidden_uses(tied):
    config = attrs.evolve(CONFIGS["llama-gqa"], tie_word_embeddings=tied)
    params = _params(config)
    w = head_weight(config, params)
    name = ("model", "embed_tokens", "weight") if tied else ("lm_head", "weight")
    assert w is params[name]
    assert Transformer(config).head_weight(params) is w
    h = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(logits_from_hidden(config, params, h), h @ w.T)


def test_gemma_head_has_softcap_but_no_embedding_scale():
    config = CONFIGS["gemma2-softcaps"]
    params = _params(config)
    h = torch.randn(3, config.hidden_size)
    w = head_weight(config, params)
    assert w is params["model", "embed_tokens", "weight"]
    cap = config.final_logit_softcap
    assert cap is not None
    torch.testing.assert_close(
        logits_from_hidden(config, params, h), cap * torch.tanh(h @ w.T / cap)
    )


def test_backend_switches_are_validated():
    with pytest.raises(ConfigError, match="attention_backend"):
        TransformerConfig(**BASE, attention_backend="flash")
    with pytest.raises(ConfigError, match="norm_backend"):
        TransformerConfig(**BASE, norm_backend="sdpa")
    with pytest.raises(ConfigError, match=r"norm_backend='triton'.*gemma"):
        TransformerConfig(**BASE, family="gemma", norm_backend="triton")
    # 'auto' on Gemma is allowed: its (1 + w) norms keep the PyTorch path.
    assert TransformerConfig(**BASE, family="gemma", norm_backend="auto").norm_backend == "auto"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backend_switches_stay_out_of_hf_config(name):
    config = CONFIGS[name]
    fast = attrs.evolve(config, attention_backend="triton", norm_backend="auto")
    exported = fast.to_hf_dict()
    assert exported == config.to_hf_dict()
    assert not any("backend" in key for key in exported)
    loaded = TransformerConfig.from_hf_dict(exported)
    assert loaded == config  # the defaults: "sdpa", "torch"
    assert attrs.evolve(loaded, attention_backend="triton", norm_backend="auto") == fast


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_the_model_under_the_interpreter(monkeypatch):
    """Attention, RMSNorm and the fused loss forced to Triton (interpreted on CPU): the loss and
    every gradient equal the default path's, with packed documents, a window and GQA."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    for module in (cross_entropy, flash_attention, rmsnorm):
        original = module.triton_module

        def spy(name: str, original=original):
            calls.append(name)
            return original(name)

        monkeypatch.setattr(module, "triton_module", spy)
    config = TransformerConfig(
        **{**BASE, "num_layers": 1, "intermediate_size": 64},
        family="mistral",
        sliding_window=4,
    )
    params, batch = _params(config), _batch(True)
    triton_cfg = attrs.evolve(config, attention_backend="triton", norm_backend="triton")
    plain = make_lm_loss(lambda p, b: apply(config, p, b))
    fused = make_fused_lm_loss(Transformer(triton_cfg), backend="triton")
    (l0, a0), g0 = value_and_grad(plain)(params, batch)
    (l1, a1), g1 = value_and_grad(fused)(params, batch)
    assert int(a1["tokens"]) == int(a0["tokens"])
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=2e-5)
    assert_trees_close(g1, g0, rtol=2e-5, atol=2e-5)
    # Forward and backward of each kernel ran in Triton.
    for kernel in ("_flash_attention_triton", "_rmsnorm_triton", "_cross_entropy_triton"):
        assert calls.count(kernel) >= 2, (kernel, calls)
