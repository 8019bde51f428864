"""model.checkpoint_layers: same gradients, fewer saved activations; LoRA, DoRA and QLoRA too."""

from __future__ import annotations

import attrs
import pytest
import torch
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.losses import make_lm_loss
from tscale.models.lora import LoraConfig, LoraModel, add_dropout_keys
from tscale.models.quant import make_qlora_model
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


LORA = {
    "lora-dropout": LoraConfig(rank=4, alpha=8, dropout=0.1),
    "dora": LoraConfig(rank=4, alpha=8, use_dora=True),
}


def _lora_grads(model: Transformer, params, config: LoraConfig, *, qlora: bool, functorch: bool):
    lm = make_qlora_model(model.apply, params, config) if qlora else None
    lm = lm or LoraModel(apply_fn=model.apply, base=params, config=config)
    adapters = _perturbed(lm.init(R.key(1), dtype=torch.float32))
    batch = add_dropout_keys(_batch(), R.key(7))
    loss_fn = make_lm_loss(lm.apply)
    if functorch:  # the engine value_and_grad uses under vmap and torch.compile
        grads, (loss, _) = torch.func.grad_and_value(loss_fn, has_aux=True)(adapters, batch)
    else:
        (loss, _), grads = value_and_grad(loss_fn)(adapters, batch)
    return loss, grads


@pytest.mark.parametrize("functorch", [False, True], ids=["autograd", "torch.func"])
@pytest.mark.parametrize("name", LORA)
def test_lora_with_checkpointed_layers_gives_the_same_gradients(name: str, functorch: bool):
    """LoRA intercepts F.linear with a TorchFunctionMode; the layer checkpoint replays that
    mode when it recomputes a layer in the backward, so the gradients do not change."""
    plain = Transformer(CFG)
    ckpt = Transformer(attrs.evolve(CFG, checkpoint_layers=True))
    params = plain.init(R.key(0))
    l1, g1 = _lora_grads(plain, params, LORA[name], qlora=False, functorch=functorch)
    l2, g2 = _lora_grads(ckpt, params, LORA[name], qlora=False, functorch=functorch)
    assert torch.equal(l1, l2)
    assert_trees_close(g2, g1, atol=1e-7, rtol=1e-6)
    assert float(T.global_norm(g1)) > 0


def test_qlora_with_checkpointed_layers_gives_the_same_gradients():
    pytest.importorskip("bitsandbytes")
    plain = Transformer(CFG)
    ckpt = Transformer(attrs.evolve(CFG, checkpoint_layers=True))
    params = plain.init(R.key(0))
    config = LoraConfig(rank=4, alpha=8)
    l1, g1 = _lora_grads(plain, params, config, qlora=True, functorch=False)
    l2, g2 = _lora_grads(ckpt, params, config, qlora=True, functorch=False)
    assert torch.equal(l1, l2)
    assert_trees_close(g2, g1, atol=1e-7, rtol=1e-6)


def _perturbed(adapters: TensorDict) -> TensorDict:
    """Non-zero B, so the adapters change the forward (B = 0 would hide a missed LoRA path)."""
    g = torch.Generator().manual_seed(3)
    return adapters.apply(lambda t: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))
