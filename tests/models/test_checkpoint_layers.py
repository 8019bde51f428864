"""model.checkpoint_layers: same gradients, fewer saved activations, LoRA still exact."""

from __future__ import annotations

import attrs
import torch
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core.grad import value_and_grad
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.testing import assert_trees_close

CFG = TransformerConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    init_std=0.05,
)


def _batch() -> TensorDict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 32), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[4])


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_checkpointed_layers_give_the_same_gradients_with_fewer_saved_activations():
    plain = Transformer(CFG)
    ckpt = Transformer(attrs.evolve(CFG, checkpoint_layers=True))
    params = plain.init(R.key(0))
    batch = _batch()
    (l1, _), g1 = value_and_grad(make_lm_loss(plain.apply))(params, batch)
    (l2, _), g2 = value_and_grad(make_lm_loss(ckpt.apply))(params, batch)
    assert torch.equal(l1, l2)
    assert_trees_close(g2, g1, atol=1e-7, rtol=1e-6)

    def run(model):
        return lambda: value_and_grad(make_lm_loss(model.apply))(params, batch)

    assert _saved_bytes(run(ckpt)) < 0.6 * _saved_bytes(run(plain))


def test_lora_with_checkpointed_layers_is_refused_by_the_builder(tmp_path):
    """LoRA intercepts F.linear with a TorchFunctionMode that is not active when torch
    recomputes a checkpointed layer in the backward, so the trainer refuses the combination."""
    import pytest

    from tscale.config import load_config
    from tscale.errors import ConfigError
    from tscale.train import builders

    cfg = load_config(None, ["model.checkpoint_layers=true", "lora.enabled=true"])
    model, base = builders.build_model(cfg, 300, R.key(0))
    with pytest.raises(ConfigError, match=r"model\.checkpoint_layers"):
        builders.build_lora_model(cfg, model, base)
