"""LM losses: the fused loss (hidden states + head weight) equals the loss over the model's logits.

On CPU ``linear_cross_entropy`` takes its reference for small problems; forcing the chunked
PyTorch algorithm (``REFERENCE_MAX_LOGITS = 0``) runs the same two-pass algorithm as the Triton
kernel. The Triton kernel itself runs in ``tests/models/test_kernel_wiring.py`` (interpreter).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.core.state import TrainState
from tscale.errors import ConfigError
from tscale.kernels import cross_entropy, linear_cross_entropy_reference
from tscale.losses import make_fused_lm_loss, make_lm_loss, token_cross_entropy
from tscale.models.transformer import FULL, SLIDING, Transformer, TransformerConfig
from tscale.optim import adamw, chain, clip_by_global_norm, warmup_cosine
from tscale.step import make_train_step
from tscale.testing import assert_trees_close

VOCAB = 53
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 64,
    "init_std": 0.1,
}
CONFIGS = {
    "untied": TransformerConfig(**BASE),
    "tied": TransformerConfig(**BASE, tie_word_embeddings=True),
    "gemma2-final-softcap": TransformerConfig(
        **BASE,
        family="gemma2",
        sliding_window=4,
        layer_types=(SLIDING, FULL),
        attn_logit_softcap=5.0,
        final_logit_softcap=0.5,  # binding: logits are bent well away from linear
        tie_word_embeddings=True,
    ),
}


def _batch(b: int = 4, s: int = 10, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[torch.rand(b, s, generator=g) < 0.3] = -100
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _params(config: TransformerConfig, seed: int = 0) -> TensorDict:
    params = Transformer(config).init(R.key(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return T.unflatten(
        {
            k: t + 0.3 * torch.randn(t.shape, generator=g) if t.dim() == 1 else t
            for k, t in T.flatten(params).items()
        }
    )


OPTIONS = [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"label_smoothing": 0.2, "z_loss": 0.1}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_loss_equals_plain_loss(name, options):
    config = CONFIGS[name]
    model = Transformer(config)
    params, batch = _params(config), _batch()
    (l0, a0), g0 = value_and_grad(make_lm_loss(model.apply, **options))(params, batch)
    (l1, a1), g1 = value_and_grad(make_fused_lm_loss(model, **options))(params, batch)
    assert a1["tokens"].dtype == torch.int64 and torch.equal(a1["tokens"], a0["tokens"])
    assert l1.dtype == l0.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert_trees_close(g1, g0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["untied", "gemma2-final-softcap"])
def test_fused_loss_chunked_path_equals_plain_and_holds_no_full_logits(name, monkeypatch):
    """The chunked two-pass algorithm (the Triton kernel's, in PyTorch) through the model: same
    loss and gradients, and no tensor of tokens x vocab elements is ever created."""
    monkeypatch.setattr(cross_entropy, "REFERENCE_MAX_LOGITS", 0)
    config = attrs.evolve(CONFIGS[name], attention_backend="torch", norm_backend="auto")
    model = Transformer(config)
    params, batch = _params(config), _batch()
    n = batch["labels"].numel()
    # Chunks of 8 tokens in the forward and ~16 vocabulary rows in the backward.
    fused = make_fused_lm_loss(model, chunk_bytes=8 * VOCAB * 12, label_smoothing=0.1, z_loss=0.01)

    class NoFullLogits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and VOCAB in t.shape and t.numel() >= n * VOCAB:
                    raise AssertionError(f"{func} made a tensor of {tuple(t.shape)}")
            return out

    with NoFullLogits():
        (l1, _), g1 = value_and_grad(fused)(params, batch)
    plain = make_lm_loss(model.apply, label_smoothing=0.1, z_loss=0.01)
    (l0, _), g0 = value_and_grad(plain)(params, batch)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert_trees_close(g1, g0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_token_cross_entropy_options_match_the_kernel_reference(options):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 7), generator=g)
    labels[0, :3] = -100
    got, tokens = token_cross_entropy(hidden @ weight.T, labels, **options)
    want, want_tokens = linear_cross_entropy_reference(hidden, weight, labels, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, want_tokens)


def test_default_lm_loss_is_unchanged():
    """Without options, the summed F.cross_entropy of before (bit for bit)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (3, 5), generator=g)
    labels[1] = -100
    loss, tokens = token_cross_entropy(logits, labels)
    want = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    assert torch.equal(loss, want) and int(tokens) == 10


def test_loss_builders_validate_options():
    model = Transformer(CONFIGS["untied"])
    for build in (partial(make_lm_loss, model.apply), partial(make_fused_lm_loss, model)):
        with pytest.raises(ConfigError, match="label_smoothing"):
            build(label_smoothing=1.5)
        with pytest.raises(ConfigError, match="z_loss"):
            build(z_loss=-1.0)
    with pytest.raises(ConfigError, match="backend"):
        make_fused_lm_loss(model, backend="cuda")
    with pytest.raises(ConfigError, match="chunk_bytes"):
        make_fused_lm_loss(model, chunk_bytes=0)


@pytest.mark.parametrize("name", ["tied", "gemma2-final-softcap"])
def test_train_step_with_fused_loss_equals_plain(name):
    config = CONFIGS[name]
    model = Transformer(config)
    fast = Transformer(attrs.evolve(config, attention_backend="auto", norm_backend="auto"))
    tx = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(1e-2, 1, 10), weight_decay=0.1))
    batches = [_batch(seed=i) for i in range(3)]

    def run(loss_fn):
        params = _params(config)
        state = TrainState.create(params, tx.init(params), R.key(1))
        step = make_train_step(loss_fn, tx, microbatches=2)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch.clone())
            losses.append(metrics["loss"])
        return state, torch.stack(losses)

    s0, l0 = run(make_lm_loss(model.apply))
    s1, l1 = run(make_fused_lm_loss(fast))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert_trees_close(s1.params, s0.params, rtol=1e-5, atol=1e-5)
    assert_trees_close(s1.opt_state, s0.opt_state, rtol=1e-5, atol=1e-5)
