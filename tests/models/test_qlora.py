"""QLoRA: an NF4 double-quantised frozen base (bitsandbytes) with LoRA adapters on top."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.losses import make_lm_loss
from tscale.models import Transformer, TransformerConfig
from tscale.models.lora import DEFAULT_TARGETS, LoraConfig, LoraModel, lora_targets
from tscale.models.quant import (
    NF4Weight,
    QLoraModel,
    QuantizedParams,
    make_qlora_model,
    quantize_params,
    quantized_bytes,
)
from tscale.optim import adamw
from tscale.step import make_train_step
from tscale.testing import assert_trees_close

bnbf = pytest.importorskip("bitsandbytes.functional")

# init_std=0.05: see tests/models/test_lora.py (a frozen head of std 0.02 caps the loss drop).
CFG = TransformerConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.05,
)
MODEL = Transformer(CFG)
PARAMS = MODEL.init(R.key(0))
LORA = LoraConfig(rank=4, alpha=8)

# NF4 rounds to the nearest of 16 levels in [-1, 1] scaled by the block's absmax: the error is at
# most half the widest level gap (0.1519, between -1 and -0.6962) times absmax, plus the error of
# the 8-bit double-quantised absmax. Measured on this model: 0.1554 · absmax.
NF4_BLOCK_ERROR = 0.16
# Relative (Frobenius) errors vs the fp32 model, measured: 0.096 for the worst weight, 0.174 for
# the logits of this random model (max abs 0.24 on logits of std 0.39; argmax agrees on 78%).
# A random 2-layer model has no redundancy to absorb the noise; trained LLMs fare better.
WEIGHT_REL_ERROR = 0.11
LOGITS_REL_ERROR = 0.22


def _batch(b: int = 4, s: int = 16, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, CFG.vocab_size, (b, s // 2), generator=g)
    ids = torch.cat([half, half], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, s // 2 - 1 : -1] = ids[:, s // 2 :]
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _perturbed(adapters: TensorDict, seed: int = 0, scale: float = 0.05) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return adapters.apply(lambda t: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _reference_dequantized(params: TensorDict, block_size: int = 64) -> TensorDict:
    """Every projection through bitsandbytes' own quantize_4bit/dequantize_4bit, by hand."""
    flat = dict(T.flatten(params))
    for name in lora_targets(params, LoraConfig(targets=DEFAULT_TARGETS)):
        q, st = bnbf.quantize_4bit(
            flat[name], blocksize=block_size, quant_type="nf4", compress_statistics=True
        )
        flat[name] = bnbf.dequantize_4bit(q, st)
    return T.unflatten(flat)


# ------------------------------------------------------------------ forward exactness and error


def test_forward_equals_plain_model_on_dequantized_weights_bitwise() -> None:
    qlm = make_qlora_model(MODEL.apply, PARAMS, LORA)
    reference = _reference_dequantized(PARAMS)
    batch = _batch()
    zero = qlm.init(R.key(1))
    assert torch.equal(qlm.apply(zero, batch), MODEL.apply(reference, batch))
    adapters = _perturbed(zero)
    dense_lora = LoraModel(apply_fn=MODEL.apply, base=reference, config=LORA)
    assert torch.equal(qlm.apply(adapters, batch), dense_lora.apply(adapters, batch))
    assert_trees_close(qlm.base.dequantize(), reference, atol=0, rtol=0)


def test_nf4_error_bound_and_logits_vs_fp32() -> None:
    q = quantize_params(PARAMS)
    flat = T.flatten(PARAMS)
    worst = 0.0
    for name, w in q.weights.items():
        x = flat[name].reshape(-1, 64)
        err = (w.dense().reshape(-1, 64) - x).abs()
        worst = max(worst, float((err / x.abs().amax(1, keepdim=True)).max()))
        assert float(err.norm() / x.norm()) <= WEIGHT_REL_ERROR, name
    levels = q.weights[name].quant_map
    half_gap = float(levels.diff().max()) / 2
    assert half_gap < worst <= NF4_BLOCK_ERROR, (half_gap, worst)

    batch = _batch()
    exact = MODEL.apply(PARAMS, batch)
    qlm = QLoraModel(apply_fn=MODEL.apply, base=q, config=LORA)
    approx = qlm.apply(qlm.init(R.key(1)), batch)
    assert float((approx - exact).norm() / exact.norm()) <= LOGITS_REL_ERROR


def test_gradients_match_lora_on_dequantized_base() -> None:
    qlm = make_qlora_model(MODEL.apply, PARAMS, LoraConfig(rank=4, alpha=8, use_dora=True))
    dense = LoraModel(apply_fn=MODEL.apply, base=qlm.base.dequantize(), config=qlm.config)
    adapters = _perturbed(qlm.init(R.key(1)))
    (lq, _), gq = value_and_grad(make_lm_loss(qlm.apply))(adapters, _batch())
    (ld, _), gd = value_and_grad(make_lm_loss(dense.apply))(adapters, _batch())
    assert torch.equal(lq, ld)
    assert_trees_close(gq, gd, atol=1e-6, rtol=1e-6)
    assert T.leaf_keys(gq) == T.leaf_keys(adapters)


def test_backward_keeps_no_dense_weight() -> None:
    """Autograd saves no [out, in] float matrix: the NF4 weights are dequantised again."""
    qlm = make_qlora_model(MODEL.apply, PARAMS, LORA)
    adapters = qlm.init(R.key(1)).apply(lambda t: t.requires_grad_(True))
    shapes = {tuple(w.shape) for w in qlm.base.weights.values()}
    dense = {t.untyped_storage().data_ptr() for t in T.leaves(qlm.base.dense)}  # e.g. lm_head
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in dense:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # 3 x 10 tokens: no activation can be mistaken for a [64|128, 64|128] weight
        loss, _ = make_lm_loss(qlm.apply)(adapters, _batch(b=3, s=10))
    assert saved and not shapes & set(saved), shapes & set(saved)
    loss.backward()
    assert all(t.grad is not None for t in T.leaves(adapters))


# ------------------------------------------------------------------ memory


def test_memory_ratio() -> None:
    q = quantize_params(PARAMS)
    report = quantized_bytes(q)
    # NF4 codes (4 bits) + 8-bit absmax per 64 + fp32 per 256 absmax + one offset per matrix,
    # plus the NF4 and 8-bit lookup tables counted once: 4.26 bits/weight on these small
    # matrices, 0.22x the fp32 model (the embeddings and head stay dense), 0.45x bf16.
    assert 4.1 < report["bits_per_weight"] < 4.3
    assert report["total"] == report["quantized"] + report["unquantized"]
    assert report["ratio_fp32"] < 0.23 and report["ratio_bf16"] < 0.46
    big = quantize_params(T.unflatten({"x.proj.weight": torch.randn(512, 512)}), ("proj",))
    bits = quantized_bytes(big)["bits_per_weight"]
    # 4 + 8/64 + 32/(64·256) = 4.127 (the paper's figure) + 0.033 for the two lookup tables
    assert 4.12 < bits < 4.17
    assert quantized_bytes(big)["ratio_bf16"] < 0.27


def test_lookup_tables_are_shared() -> None:
    q = quantize_params(PARAMS)
    maps = {w.quant_map.data_ptr() for w in q.weights.values()}
    nested = {w.nested_quant_map.data_ptr() for w in q.weights.values()}
    assert len(maps) == 1 and len(nested) == 1


# ------------------------------------------------------------------ serialisation


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    q = quantize_params(PARAMS)
    sd = q.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert sd[name].dtype == torch.uint8
    assert {
        f"{name}.absmax",
        f"{name}.quant_map",
        f"{name}.nested_absmax",
        f"{name}.nested_quant_map",
        f"{name}.quant_state.bitsandbytes__nf4",
    } <= set(sd)
    save_file(sd, str(tmp_path / "q.safetensors"))
    back = QuantizedParams.from_state_dict(load_file(str(tmp_path / "q.safetensors")))
    # safetensors sorts the names; the tree order is the file's
    assert sorted(back.names) == sorted(q.names) and set(back.weights) == set(q.weights)
    batch = _batch()
    original = QLoraModel(apply_fn=MODEL.apply, base=q, config=LORA)
    adapters = _perturbed(original.init(R.key(1)))
    loaded = QLoraModel(apply_fn=MODEL.apply, base=back, config=LORA)
    assert torch.equal(loaded.apply(adapters, batch), original.apply(adapters, batch))


# ------------------------------------------------------------------ training


def test_qlora_sft_reduces_loss_and_trains_only_adapters() -> None:
    qlm = make_qlora_model(MODEL.apply, PARAMS, LoraConfig(rank=8, alpha=16))
    codes = {k: w.data.clone() for k, w in qlm.base.weights.items()}
    adapters = qlm.init(R.key(1), dtype=torch.float32)
    tx = adamw(1e-2)
    step = make_train_step(make_lm_loss(qlm.apply), tx)
    state = TrainState.create(adapters, tx.init(adapters), R.key(2))
    batch = _batch(b=8)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] <= 0.7 * losses[0], losses
    moments = [k for k in T.leaf_keys(state.opt_state) if not k.endswith(".count")]
    assert all(".lora_" in k for k in moments)
    assert all(torch.equal(w.data, codes[k]) for k, w in qlm.base.weights.items())


def test_bf16_base_with_fp32_adapters() -> None:
    params = PARAMS.apply(lambda t: t.to(torch.bfloat16))
    qlm = make_qlora_model(MODEL.apply, params, LORA)
    assert all(w.dtype == torch.bfloat16 for w in qlm.base.weights.values())
    adapters = _perturbed(qlm.init(R.key(1), dtype=torch.float32))
    out = qlm.apply(adapters, _batch())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    (_, _), grads = value_and_grad(make_lm_loss(qlm.apply))(adapters, _batch())
    assert all(g.dtype == torch.float32 for g in T.leaves(grads))


# ------------------------------------------------------------------ errors


def test_errors() -> None:
    with pytest.raises(ShapeError, match="whole number of NF4 blocks"):
        NF4Weight.quantize(torch.randn(3, 7))
    with pytest.raises(ShapeError, match="float32/bfloat16/float16"):
        NF4Weight.quantize(torch.randn(8, 8, dtype=torch.float64))
    with pytest.raises(ShapeError, match="block_size"):
        NF4Weight.quantize(torch.randn(8, 8), block_size=48)
    with pytest.raises(ShapeError, match="quantisation target pattern 'nope'"):
        quantize_params(PARAMS, ("nope",))
    with pytest.raises(TypeError, match="QuantizedParams"):
        QLoraModel(apply_fn=MODEL.apply, base=PARAMS, config=LORA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda_matches_cpu() -> None:
    q_cpu = quantize_params(PARAMS)
    q_gpu = quantize_params(PARAMS.to("cuda"))
    for name, w in q_cpu.weights.items():  # same codes from both backends
        assert torch.equal(w.data, q_gpu.weights[name].data.cpu()), name
    adapters = _perturbed(QLoraModel(apply_fn=MODEL.apply, base=q_cpu, config=LORA).init(R.key(1)))
    batch = _batch()
    cpu = QLoraModel(apply_fn=MODEL.apply, base=q_cpu, config=LORA).apply(adapters, batch)
    gpu_model = QLoraModel(apply_fn=MODEL.apply, base=q_gpu, config=LORA)
    gpu = gpu_model.apply(adapters.to("cuda"), batch.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    reference = MODEL.apply(q_gpu.dequantize(), batch.to("cuda"))
    zero = gpu_model.init(R.key(1))
    assert torch.equal(gpu_model.apply(zero, batch.to("cuda")), reference)
    tx = adamw(1e-2)
    adapters = gpu_model.init(R.key(1))
    state = TrainState.create(adapters, tx.init(adapters), R.key(2))
    state, m = make_train_step(make_lm_loss(gpu_model.apply), tx)(state, _batch(b=8).to("cuda"))
    assert torch.isfinite(m["loss"])
