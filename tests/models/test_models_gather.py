"""The model's ``gather`` hook: called once for the non-layer params and once per layer, inside
the recomputed region when checkpointing; an identity gather changes nothing."""

from __future__ import annotations

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.models.transformer import Transformer, TransformerConfig


def _setup(**kw):
    cfg = TransformerConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, **kw
    )
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, model.init(R.key(0)), TensorDict({"input_ids": ids}, [2])


def test_gather_sees_root_then_each_layer_and_changes_nothing():
    model, params, batch = _setup()
    seen: list[list[str]] = []

    def gather(group: TensorDictBase) -> TensorDictBase:
        seen.append(T.leaf_keys(group))
        return group.apply(lambda t: t * 1.0)  # a new tensor per leaf, like an all-gather

    out = model.apply(params, batch, gather=gather)
    assert torch.equal(out, model.apply(params, batch))
    assert len(seen) == 1 + 3
    assert "model.embed_tokens.weight" in seen[0] and "model.norm.weight" in seen[0]
    assert not any(k.startswith("model.layers") for k in seen[0])
    assert all(k.startswith("self_attn") or "layernorm" in k or "mlp" in k for k in seen[1])


def test_gather_runs_again_in_the_backward_when_checkpointing():
    model, params, batch = _setup()
    ckpt = Transformer(attrs.evolve(model.config, checkpoint_layers=True))
    calls = {"n": 0}

    def gather(group: TensorDictBase) -> TensorDictBase:
        calls["n"] += 1
        return group.apply(lambda t: t * 1.0)

    leaves = [t.requires_grad_(True) for t in T.leaves(params)]
    live = T.unflatten(dict(zip(T.leaf_keys(params), leaves, strict=True)))
    loss = ckpt.apply(live, batch, gather=gather).square().mean()
    grads = torch.autograd.grad(loss, leaves)
    ref = torch.autograd.grad(model.apply(live, batch).square().mean(), leaves)
    assert calls["n"] == 1 + 3 + 3  # the layers' gathers are recomputed with them
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)
