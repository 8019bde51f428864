"""The model protocol and its wrappers: LoRA, the dtype cast and the gather hook compose, and
every wrapper offers the whole protocol (fused loss, cached generation)."""

from __future__ import annotations

import attrs
import pytest
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.losses import make_fused_lm_loss, make_lm_loss
from tscale.models import Model, Transformer, TransformerConfig, generate
from tscale.models.lora import LoraConfig, LoraModel, add_dropout_keys, merge
from tscale.models.protocol import LanguageModel, layers
from tscale.models.stack import CastModel, stack_model
from tscale.parallel.ddp import OverlappedDDP, OverlappedModel
from tscale.testing import assert_trees_close, assert_trees_equal

CFG = TransformerConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
MODEL = Transformer(CFG)
PARAMS = MODEL.init(R.key(0))
HEAD = (*LoraConfig().targets, "lm_head")
TIED = attrs.evolve(CFG, tie_word_embeddings=True)


def _batch(b: int = 3, s: int = 12, seed: int = 0, vocab: int = 64) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _random_adapters(lm: LoraModel, seed: int = 1) -> TensorDict:
    """Adapters with non-zero B (at init the adapted model equals the base: tests would pass
    with the adapters ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = lm.init(R.key(seed))
    return out.apply(lambda t: t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _lora(
    targets: tuple[str, ...] = HEAD,
    config: TransformerConfig = CFG,
    dora: bool = False,
) -> tuple[LoraModel, TensorDict, TensorDict]:
    model = Transformer(config)
    base = model.init(R.key(0))
    lm = LoraModel(
        model=model, base=base, config=LoraConfig(rank=4, targets=targets, use_dora=dora)
    )
    return lm, base, _random_adapters(lm)


def test_every_model_and_wrapper_implements_the_protocol():
    lm, _, _ = _lora()
    stacked = stack_model(MODEL, lora=LoraConfig(rank=2), base=PARAMS, param_dtype=torch.bfloat16)
    loaded = Model(config=CFG, params=PARAMS)
    wrappers = (CastModel(MODEL, torch.bfloat16), stacked, OverlappedModel(MODEL, None))
    for m in (MODEL, loaded, lm, *wrappers):
        assert isinstance(m, LanguageModel), type(m).__name__
    assert [type(m) for m in layers(stacked)] == [CastModel, LoraModel, Transformer]
    # A bound ``model.apply`` (today's builders) gives the same full-protocol LoRA model.
    assert LoraModel(apply_fn=MODEL.apply, base=PARAMS).model is MODEL


@pytest.mark.parametrize(
    ("targets", "config", "dora"),
    [
        (LoraConfig().targets, CFG, False),
        (HEAD, CFG, False),
        (HEAD, CFG, True),
        ((*LoraConfig().targets, "embed_tokens"), TIED, False),
    ],
    ids=["blocks", "head", "head-dora", "tied-embedding"],
)
def test_lora_hidden_states_and_head_compose_to_apply(targets, config, dora):
    lm, base, adapters = _lora(targets, config, dora)
    batch = _batch()
    logits = lm.apply(adapters, batch)
    h = lm.hidden_states(adapters, batch)
    torch.testing.assert_close(lm.logits_from_hidden(adapters, h), logits, rtol=0, atol=1e-6)
    merged = merge(base, adapters, lm.config)
    torch.testing.assert_close(
        lm.head_weight(adapters), Transformer(config).head_weight(merged), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        logits, Transformer(config).apply(merged, batch), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("targets", "config", "dora"),
    [(LoraConfig().targets, CFG, False), (HEAD, CFG, True), ((*HEAD, "embed_tokens"), TIED, False)],
    ids=["blocks", "head-dora", "tied-embedding"],
)
def test_lora_fused_loss_equals_the_unfused_loss(targets, config, dora):
    if config.tie_word_embeddings:
        targets = tuple(t for t in targets if t != "lm_head")
    # float64: the two paths round differently (s·B(A h) added to W h vs W + s·B @ A), which
    # float32 gradients show at 1e-6 of their norm; in float64 they agree to 1e-14.
    config = attrs.evolve(config, dtype=torch.float64)
    lm, _, adapters = _lora(targets, config, dora)
    batch = _batch()
    (plain, aux), g_plain = value_and_grad(make_lm_loss(lm.apply))(adapters, batch)
    (fused, aux_f), g_fused = value_and_grad(make_fused_lm_loss(lm, backend="torch"))(
        adapters, batch
    )
    assert int(aux["tokens"]) == int(aux_f["tokens"]) > 0
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-10)
    assert_trees_close(g_fused, g_plain, atol=1e-10, rtol=1e-10)
    # The adapters reach the fused loss: it differs from the base model's.
    base_loss, _ = make_fused_lm_loss(Transformer(config), backend="torch")(lm.base_of(None), batch)
    assert not torch.allclose(base_loss, fused)


def test_lora_cached_generation_equals_generation_with_merged_params():
    lm, base, adapters = _lora()
    merged = merge(base, adapters, lm.config)
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12]]
    kw = {"max_new_tokens": 8, "pad_id": 0}
    want = generate(MODEL, merged, prompts, **kw)
    assert generate(lm, adapters, prompts, **kw) == want  # with the cache, adapters unmerged
    assert generate(lm, adapters, prompts, use_cache=False, **kw) == want
    assert want != generate(MODEL, base, prompts, **kw)  # the adapters change the tokens
    # Prefill logits against the cache equal the uncached adapted logits.
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    cache = lm.init_cache(1, 8)
    cached, cache = lm.apply_with_cache(adapters, batch, cache, 0)
    torch.testing.assert_close(cached, lm.apply(adapters, batch), rtol=0, atol=1e-5)
    nxt, _ = lm.apply_with_cache(adapters, {"input_ids": torch.tensor([[4]])}, cache, 5)
    full = lm.apply(adapters, {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 4]])})
    torch.testing.assert_close(nxt[:, -1], full[:, -1], rtol=0, atol=1e-5)


def test_the_frozen_base_comes_from_the_call_when_given():
    lm, base, adapters = _lora()
    other = MODEL.init(R.key(7))
    batch = _batch()
    want = LoraModel(model=MODEL, base=other, config=lm.config).apply(adapters, batch)
    got = lm.apply(adapters, batch, frozen={"base": other})
    assert_trees_equal(TensorDict(a=got), TensorDict(a=want))
    assert not torch.equal(got, lm.apply(adapters, batch))
    # Without a base of its own, every call must bring one.
    bare = LoraModel(model=MODEL, config=lm.config)
    assert bare.targets == ()
    torch.testing.assert_close(
        bare.apply(adapters, batch, frozen={"base": base}), lm.apply(adapters, batch)
    )
    with pytest.raises(ValueError, match="has no base"):
        bare.apply(adapters, batch)
    # The losses hand frozen trees on.
    for make in (lambda: make_lm_loss(bare.apply), lambda: make_fused_lm_loss(bare)):
        loss, _ = make()(adapters, batch, frozen={"base": base})
        loss_own, _ = make_lm_loss(lm.apply)(adapters, batch)
        torch.testing.assert_close(loss, loss_own, rtol=1e-6, atol=1e-5)


def test_lora_from_a_bare_apply_offers_apply_only():
    lm = LoraModel(apply_fn=lambda p, b: MODEL.apply(p, b), base=PARAMS, config=LoraConfig())
    adapters = _random_adapters(lm)
    with pytest.raises(TypeError, match="needs the wrapped model"):
        lm.hidden_states(adapters, _batch())
    assert not lm.offers_cache
    prompts = [[1, 2, 3]]
    full = LoraModel(model=MODEL, base=PARAMS, config=LoraConfig())
    kw = {"max_new_tokens": 4, "pad_id": 0}
    assert generate(lm, adapters, prompts, **kw) == generate(full, adapters, prompts, **kw)


def _copying_gather(seen: list[str]):
    """A gather hook that, like FSDP's, returns new tensors (here: copies) for the stored ones."""

    def gather(group: TensorDictBase) -> TensorDictBase:
        seen.extend(T.leaf_keys(group))
        return group.apply(lambda t: t * 1.0)

    return gather


@pytest.mark.parametrize("checkpoint", [False, True])
def test_lora_adapts_the_weights_a_gather_hook_makes(checkpoint):
    config = attrs.evolve(CFG, checkpoint_layers=checkpoint)
    lm, _, adapters = _lora(HEAD, config)
    batch = _batch()
    seen: list[str] = []
    (want, _), g_want = value_and_grad(make_fused_lm_loss(lm, backend="torch"))(adapters, batch)

    class Gathered:  # the outermost wrapper of a parallel run, with a copying gather
        def hidden_states(self, params, batch, **kw):
            return lm.hidden_states(params, batch, gather=_copying_gather(seen), **kw)

        def head_weight(self, params, **kw):
            return lm.head_weight(params, gather=_copying_gather(seen), **kw)

        final_logit_softcap = None

    (got, _), g_got = value_and_grad(make_fused_lm_loss(Gathered(), backend="torch"))(
        adapters, batch
    )
    assert "self_attn.q_proj.weight" in seen and "weight" in seen  # layers, then the head
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert_trees_close(g_got, g_want, atol=1e-7, rtol=1e-6)
    logits = lm.apply(adapters, batch, gather=_copying_gather(seen))
    torch.testing.assert_close(logits, lm.apply(adapters, batch), rtol=0, atol=0)


def cast_apply(apply_fn, dtype):
    """``tscale.train.distributed.cast_apply`` as it was before CastModel (the trainer's closure
    CastModel replaces), kept here so the comparison survives its removal."""

    def run(params, batch, **kw):
        cast = params.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        return apply_fn(cast, batch, **kw)

    return run


def test_cast_model_equals_cast_apply():
    batch = _batch()
    dtype = torch.bfloat16
    for model, params in ((MODEL, PARAMS), *[(_lora()[0], _lora()[2])]):
        want_fn = make_lm_loss(cast_apply(model.apply, dtype))
        got_fn = make_lm_loss(CastModel(model, dtype).apply)
        (want, _), g_want = value_and_grad(want_fn)(params, batch)
        (got, _), g_got = value_and_grad(got_fn)(params, batch)
        assert torch.equal(got, want)
        assert_trees_equal(g_got, g_want)
        assert all(g.dtype == torch.float32 for g in T.leaves(g_got))  # master dtype
    # The stacked LoRA + cast model: the same numbers as cast_apply over LoRA's apply.
    lm, base, adapters = _lora()
    stacked = stack_model(MODEL, lora=lm.config, base=base, param_dtype=dtype)
    a = make_lm_loss(stacked.apply)(adapters, batch)[0]
    b = make_lm_loss(cast_apply(lm.apply, dtype))(adapters, batch)[0]
    assert torch.equal(a, b)
    fused = make_fused_lm_loss(stacked, backend="torch")(adapters, batch)[0]
    torch.testing.assert_close(fused, a, rtol=2e-2, atol=0)  # bf16 logits vs fused in fp32


def test_overlapped_model_refuses_lora_and_passes_its_hook():
    lm, _, _ = _lora()
    with pytest.raises(ValueError, match="frozen base, not the adapters"):
        OverlappedModel(lm, OverlappedDDP(None))
    calls: list[int] = []

    class Counting(OverlappedDDP):
        def gather(self, stored):
            calls.append(len(T.leaf_keys(stored)))
            return stored

    m = Counting(None).wrap(MODEL)
    torch.testing.assert_close(m.apply(PARAMS, _batch()), MODEL.apply(PARAMS, _batch()))
    assert len(calls) == 1 + CFG.num_layers


def test_qlora_stacks_and_offers_the_fused_loss_and_cached_generation():
    pytest.importorskip("bitsandbytes.functional")
    from tscale.models.quant import QLoraModel, quantize_params

    base = MODEL.init(R.key(3))
    config = LoraConfig(rank=4, targets=HEAD)
    qlm = stack_model(MODEL, lora=config, base=quantize_params(base, HEAD, block_size=64))
    assert isinstance(qlm, QLoraModel) and isinstance(qlm, LanguageModel)
    adapters = _random_adapters(qlm)
    batch = _batch()
    (plain, _), g_plain = value_and_grad(make_lm_loss(qlm.apply))(adapters, batch)
    (fused, _), g_fused = value_and_grad(make_fused_lm_loss(qlm, backend="torch"))(adapters, batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    # float32 (bitsandbytes dequantises to it): the two head paths round differently, so the
    # gradients are compared as a whole, relative to their norm.
    pairs = zip(T.leaves(g_fused), T.leaves(g_plain), strict=True)
    diff = torch.stack([(a - b).norm() for a, b in pairs])
    norm = torch.stack([b.norm() for b in T.leaves(g_plain)])
    assert float(diff.norm() / norm.norm()) < 1e-5
    merged = qlm.merged(adapters)  # dequantised, adapters folded in
    prompts = [[5, 6, 7], [9]]
    kw = {"max_new_tokens": 6, "pad_id": 0}
    assert generate(qlm, adapters, prompts, **kw) == generate(MODEL, merged, prompts, **kw)


def test_lora_dropout_on_the_head_is_refused_by_the_fused_loss_only():
    lm, base, adapters = _lora()
    dropping = LoraModel(model=MODEL, base=base, config=attrs.evolve(lm.config, dropout=0.1))
    with pytest.raises(ValueError, match=r"LoRA dropout \(0.1\) on the LM head"):
        make_fused_lm_loss(dropping, backend="torch")(adapters, _batch())
    make_lm_loss(dropping.apply)(adapters, _batch())  # the unfused loss takes it
    # Block targets keep their dropout under the fused loss: the same masks as the unfused one.
    model = Transformer(attrs.evolve(CFG, dtype=torch.float64))
    blocks = LoraModel(model=model, base=model.init(R.key(0)), config=LoraConfig(dropout=0.3))
    adapters = _random_adapters(blocks)
    batch = add_dropout_keys(_batch(), R.key(9))
    fused = make_fused_lm_loss(blocks, backend="torch")(adapters, batch)[0]
    plain = make_lm_loss(blocks.apply)(adapters, batch)[0]
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-10)
    assert not torch.allclose(plain, make_lm_loss(blocks.apply)(adapters, _batch())[0])
