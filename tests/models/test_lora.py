"""LoRA/DoRA as a pure transform: exact at init, merge = unmerged, adapters only, PEFT format."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.checkpoint.peft import load_adapter, save_adapter
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.core.state import TrainState
from tscale.errors import CheckpointError, ShapeError
from tscale.losses import make_lm_loss
from tscale.models import Transformer, TransformerConfig
from tscale.models.lora import (
    DROPOUT_KEY,
    LoraConfig,
    LoraModel,
    add_dropout_keys,
    init_lora,
    lora_apply,
    lora_targets,
    merge,
    unmerge,
    with_dropout_keys,
)
from tscale.optim import adamw
from tscale.step import make_train_step
from tscale.step.compose import accumulate_gradients, split_microbatches
from tscale.testing import assert_trees_close, assert_trees_equal

transformers.logging.set_verbosity_error()

# init_std=0.05, not the default 0.02: the LM head and final norm are frozen, and rows of norm
# 0.02·√64 cap the logits near ±1.3, a loss floor of ~2.9 nats (-30%) that no adapter can pass.
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


def _batch(b: int = 4, s: int = 16, seed: int = 0) -> TensorDict:
    """A fixed copy task: the second half of each row repeats the first half."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, CFG.vocab_size, (b, s // 2), generator=g)
    ids = torch.cat([half, half], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, s // 2 - 1 : -1] = ids[:, s // 2 :]  # pre-shifted: predict the copied half
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _perturbed(adapters: TensorDict, seed: int = 0, scale: float = 0.05) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return adapters.apply(lambda t: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


CONFIGS = {
    "lora": LoraConfig(rank=4, alpha=8),
    "dora-rslora": LoraConfig(rank=4, alpha=8, use_dora=True, use_rslora=True),
    "qv-gaussian": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"), init="gaussian"),
}


# ------------------------------------------------------------------ exactness and merging


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_b_equals_base_bitwise(name: str) -> None:
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=CONFIGS[name])
    adapters = lm.init(R.key(1))
    assert all(torch.count_nonzero(t) == 0 for k, t in T.flatten(adapters).items() if "lora_B" in k)
    batch = _batch()
    assert torch.equal(lm.apply(adapters, batch), MODEL.apply(PARAMS, batch))


def test_adapter_names_and_shapes_follow_peft() -> None:
    adapters = init_lora(PARAMS, LoraConfig(rank=4, use_dora=True), R.key(1))
    flat = T.flatten(adapters)
    p = "model.layers.1.mlp.down_proj."
    assert flat[p + "lora_A.weight"].shape == (4, 128)
    assert flat[p + "lora_B.weight"].shape == (64, 4)
    assert flat[p + "lora_magnitude_vector"].shape == (64,)
    assert len(flat) == 2 * 7 * 3
    # A is PEFT's kaiming_uniform_(a=√5): U(±1/√in)
    a = flat[p + "lora_A.weight"]
    assert a.abs().max() <= 1 / 128**0.5 and a.std() > 0.5 / (3 * 128) ** 0.5
    # same key, same adapters
    assert_trees_equal(adapters, init_lora(PARAMS, LoraConfig(rank=4, use_dora=True), R.key(1)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_equals_unmerged(name: str) -> None:
    config = CONFIGS[name]
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=config)
    adapters = _perturbed(lm.init(R.key(1)))
    batch = _batch()
    adapted = lm.apply(adapters, batch)
    merged = merge(PARAMS, adapters, config)
    assert (MODEL.apply(merged, batch) - adapted).abs().max() <= 1e-5
    assert (adapted - MODEL.apply(PARAMS, batch)).abs().max() > 1e-2  # the adapters do matter
    assert_trees_close(lm.merged(adapters), merged, atol=0, rtol=0)
    if config.use_dora:
        with pytest.raises(ValueError, match="DoRA"):
            unmerge(merged, adapters, config)
    else:
        assert_trees_close(unmerge(merged, adapters, config), PARAMS, atol=1e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    rank=st.integers(1, 6),
    alpha=st.floats(0.5, 32.0),
    out=st.integers(1, 9),
    inp=st.integers(1, 9),
    rows=st.integers(1, 3),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_adapter_equals_merged_weight(
    rank: int, alpha: float, out: int, inp: int, rows: int, rslora: bool, seed: int
) -> None:
    """For any shapes: F.linear through LoRA == F.linear with W + s·B@A, and unmerge inverts."""
    g = torch.Generator().manual_seed(seed)
    base = T.unflatten(
        {"layer.proj.weight": torch.randn(out, inp, generator=g, dtype=torch.float64)}
    )
    config = LoraConfig(rank=rank, alpha=alpha, targets=("proj",), use_rslora=rslora)
    adapters = _perturbed(init_lora(base, config, R.key(seed)), seed, 0.3)
    x = torch.randn(rows, inp, generator=g, dtype=torch.float64)
    apply = lora_apply(lambda p, b: F.linear(b["x"], p["layer", "proj", "weight"]), config)
    y = apply(adapters, {"x": x}, base)
    a, b = (
        adapters["layer", "proj", "lora_A", "weight"],
        adapters["layer", "proj", "lora_B", "weight"],
    )
    ref = x @ (base["layer", "proj", "weight"] + config.scale * b @ a).T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    merged = merge(base, adapters, config)
    torch.testing.assert_close(
        unmerge(merged, adapters, config)["layer", "proj", "weight"],
        base["layer", "proj", "weight"],
        rtol=0,
        atol=1e-12,
    )


def test_other_uses_of_a_target_get_the_effective_weight() -> None:
    """A model that reads a target through `@`, `.T` or F.embedding still sees W + s·B@A."""
    base = T.unflatten({"emb.weight": torch.randn(10, 6), "proj.weight": torch.randn(5, 6)})
    config = LoraConfig(rank=2, alpha=2, targets=("emb", "proj"))
    adapters = _perturbed(init_lora(base, config, R.key(0)), 1, 0.5)

    def apply_fn(p, batch):
        h = F.embedding(batch["ids"], p["emb", "weight"])
        return h @ p["proj", "weight"].T

    batch = {"ids": torch.tensor([[1, 2, 9]])}
    lm = LoraModel(apply_fn=apply_fn, base=base, config=config)
    torch.testing.assert_close(
        lm.apply(adapters, batch), apply_fn(merge(base, adapters, config), batch)
    )


def test_unused_target_is_an_error() -> None:
    base = T.unflatten({"a.weight": torch.randn(3, 3), "b.weight": torch.randn(3, 3)})
    config = LoraConfig(rank=1, targets=("a", "b"))
    lm = LoraModel(
        apply_fn=lambda p, b: F.linear(b["x"], p["a", "weight"]), base=base, config=config
    )
    with pytest.raises(ShapeError, match=r"never used.*b\.weight"):
        lm.apply(lm.init(R.key(0)), {"x": torch.randn(2, 3)})


# ------------------------------------------------------------------ targets and validation


def test_target_patterns() -> None:
    glob = lora_targets(PARAMS, LoraConfig(targets=("model.layers.0.*_proj.weight",)))
    assert len(glob) == 7 and all(n.startswith("model.layers.0.") for n in glob)
    bare = lora_targets(PARAMS, LoraConfig(targets=("q_proj", "down_proj")))
    assert bare == (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    )
    regex = lora_targets(
        PARAMS, LoraConfig(targets=(r"re:model\.layers\.1\.self_attn\.[qk]_proj\.weight",))
    )
    assert regex == (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    )
    with pytest.raises(ShapeError, match="'qq_proj' matches no parameter"):
        lora_targets(PARAMS, LoraConfig(targets=("qq_proj",)))
    with pytest.raises(ShapeError, match="only 2-D"):
        lora_targets(PARAMS, LoraConfig(targets=("*norm.weight",)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ()}, "empty"),
        ({"init": "zeros"}, "init"),
        ({"targets": ("re:(",)}, "regular expression"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_adapter_shape_mismatch_is_an_error() -> None:
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=2))
    other = init_lora(MODEL.init(R.key(0)), LoraConfig(rank=2, targets=("q_proj",)), R.key(0))
    flat = T.flatten(other)
    flat["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 3)
    with pytest.raises(ShapeError, match="lora_A"):
        lm.apply(T.unflatten(flat), _batch())


# ------------------------------------------------------------------ training only adapters


def _train(
    lm: LoraModel,
    steps: int,
    lr: float = 1e-2,
    batch: TensorDict | None = None,
    microbatches: int = 1,
    dropout: bool = False,
):
    adapters = lm.init(R.key(1), dtype=torch.float32)
    tx = adamw(lr)
    step = make_train_step(make_lm_loss(lm.apply), tx, microbatches=microbatches)
    if dropout:
        step = with_dropout_keys(step)
    state = TrainState.create(adapters, tx.init(adapters), R.key(2))
    batch = _batch(b=8) if batch is None else batch
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def test_only_adapters_get_gradients_and_optimizer_state() -> None:
    before = T.clone(PARAMS)
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=4, alpha=8))
    (_, _), grads = value_and_grad(make_lm_loss(lm.apply))(lm.init(R.key(1)), _batch())
    assert all(".lora_" in k for k in T.leaf_keys(grads))
    state, _ = _train(lm, steps=3)
    moments = [k for k in T.leaf_keys(state.opt_state) if not k.endswith(".count")]
    assert moments and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in moments)
    assert {k.split(".", 2)[2] for k in moments} == set(T.leaf_keys(state.params))
    # Adam's mu and nu for every adapter leaf, plus the step counter; nothing of the base
    assert T.num_elements(state.opt_state) == 2 * T.num_elements(state.params) + 1
    assert T.leaf_keys(state.params) == T.leaf_keys(lm.init(R.key(1)))
    assert all(
        torch.count_nonzero(t) > 0 for k, t in T.flatten(state.params).items() if "lora_B" in k
    )
    assert_trees_equal(PARAMS, before)  # the base was never written
    assert lm.base.is_locked and not PARAMS.is_locked


def test_lora_sft_reduces_loss() -> None:
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=8, alpha=16))
    _, losses = _train(lm, steps=40)
    assert losses[-1] <= 0.7 * losses[0], losses


def test_dora_sft_reduces_loss() -> None:
    lm = LoraModel(
        apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=8, alpha=16, use_dora=True)
    )
    _, losses = _train(lm, steps=40)
    assert losses[-1] <= 0.7 * losses[0], losses


def test_torch_func_gradients_match_autograd() -> None:
    lm = LoraModel(
        apply_fn=MODEL.apply,
        base=PARAMS,
        config=LoraConfig(rank=2, alpha=4, use_dora=True, targets=("q_proj", "up_proj")),
    )
    adapters = _perturbed(lm.init(R.key(1)))
    loss = make_lm_loss(lm.apply)
    (_, _), eager = value_and_grad(loss)(adapters, _batch())
    functorch = torch.func.grad(lambda a: loss(a, _batch())[0])(adapters)
    assert_trees_close(eager, functorch, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ dropout


def test_dropout_zero_ignores_keys_exactly() -> None:
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=4, dropout=0.0))
    adapters = _perturbed(lm.init(R.key(1)))
    batch = _batch()
    assert torch.equal(
        lm.apply(adapters, add_dropout_keys(batch, R.key(5))), lm.apply(adapters, batch)
    )


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_is_real_and_reproducible(use_dora: bool) -> None:
    config = LoraConfig(rank=4, alpha=8, dropout=0.5, use_dora=use_dora)
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=config)
    adapters = _perturbed(lm.init(R.key(1)))
    batch = _batch()
    eval_out = lm.apply(adapters, batch)  # no key: no dropout (evaluation)
    no_drop = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=attrs.evolve(config, dropout=0.0))
    assert torch.equal(eval_out, no_drop.apply(adapters, batch))
    k1, k2 = add_dropout_keys(batch, R.key(5)), add_dropout_keys(batch, R.key(6))
    assert k1[DROPOUT_KEY].shape == (4, 2)
    y1, y1b, y2 = lm.apply(adapters, k1), lm.apply(adapters, k1), lm.apply(adapters, k2)
    assert torch.equal(y1, y1b)
    assert not torch.allclose(y1, y2) and not torch.allclose(y1, eval_out)
    # B = 0: dropout on the LoRA input cannot change the output
    zero = lm.init(R.key(1))
    assert torch.equal(lm.apply(zero, k1), MODEL.apply(PARAMS, batch))


def test_dropout_mask_rate_and_scale() -> None:
    """The LoRA input of one target, seen through a linear probe: ~p zeros, mean kept."""
    p = 0.3
    base = T.unflatten({"proj.weight": torch.zeros(1, 4096)})
    config = LoraConfig(rank=1, alpha=1, dropout=p, targets=("proj",))
    adapters = T.unflatten(
        {"proj.lora_A.weight": torch.ones(1, 4096), "proj.lora_B.weight": torch.ones(1, 1)}
    )
    seen = {}

    def apply_fn(params, batch):
        return F.linear(batch["x"], params["proj", "weight"])

    x = torch.ones(2, 4096)
    for k in range(3):
        batch = {"x": x, DROPOUT_KEY: R.split(R.key(k), 2)}
        seen[k] = LoraModel(apply_fn=apply_fn, base=base, config=config).apply(adapters, batch)
    # output = sum of kept inputs / (1 - p): its mean over 4096 inputs is ~4096
    for y in seen.values():
        assert torch.allclose(y / 4096, torch.ones_like(y), atol=0.05)
    assert not torch.equal(seen[0], seen[1])
    # direct look at the mask: drop rate ≈ p, the same on every row only by chance
    from tscale.models.lora import _dropout

    m = _dropout(torch.ones(4, 8192), R.split(R.key(0), 4), p, salt=3)
    zeros = (m == 0).float().mean(1)
    assert torch.all((zeros - p).abs() < 0.03), zeros
    assert torch.allclose(m[m > 0], torch.full_like(m[m > 0], 1 / (1 - p)))
    assert not torch.equal(m[0], m[1])


def test_dropout_accumulation_equals_big_batch() -> None:
    """Per-row keys split with the batch: microbatch gradients sum to the big batch's."""
    lm = LoraModel(
        apply_fn=MODEL.apply, base=PARAMS, config=LoraConfig(rank=4, alpha=8, dropout=0.2)
    )
    adapters = _perturbed(lm.init(R.key(1)))
    loss = make_lm_loss(lm.apply)
    batch = add_dropout_keys(_batch(b=8), R.key(3))
    whole, loss_whole, _ = accumulate_gradients(loss, adapters, split_microbatches(batch, 1))
    parts, loss_parts, _ = accumulate_gradients(loss, adapters, split_microbatches(batch, 4))
    torch.testing.assert_close(loss_parts, loss_whole, rtol=1e-6, atol=0)
    assert_trees_close(parts, whole, atol=1e-6, rtol=1e-5)
    (_, _), no_drop = value_and_grad(loss)(adapters, _batch(b=8))
    assert not torch.allclose(T.leaves(whole)[0], T.leaves(no_drop)[0])


def test_with_dropout_keys_draws_new_masks_each_step() -> None:
    seen = []

    def step(state, batch):
        seen.append(batch[DROPOUT_KEY])
        return state.replace(step=state.step + 1), {}

    state = TrainState.create(T.unflatten({"w": torch.zeros(1)}), TensorDict({}, []), R.key(0))
    wrapped = with_dropout_keys(step)
    for _ in range(2):
        state, _ = wrapped(state, _batch())
    assert seen[0].shape == (4, 2) and not torch.equal(seen[0], seen[1])
    assert len({tuple(k.tolist()) for k in seen[0]}) == 4  # one key per row
    again = []
    state = TrainState.create(T.unflatten({"w": torch.zeros(1)}), TensorDict({}, []), R.key(0))
    with_dropout_keys(lambda s, b: (again.append(b[DROPOUT_KEY]), (s, {}))[1])(state, _batch())
    assert torch.equal(again[0], seen[0])  # a function of (rng, step) only: resumable


# ------------------------------------------------------------------ PEFT compatibility


def _hf_model(params: TensorDict) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf_dict()))
    hf.load_state_dict({k: v.clone() for k, v in T.flatten(params).items()}, strict=True)
    return hf.eval()


def _peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("peft")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_adapter_loads_in_peft(name: str, tmp_path) -> None:
    peft = _peft()
    config = CONFIGS[name]
    lm = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=config)
    adapters = _perturbed(lm.init(R.key(1)))
    save_adapter(adapters, config, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_hf_model(PARAMS), str(tmp_path / "adapter")).eval()
    batch = _batch()
    with torch.no_grad():
        theirs = pm(input_ids=batch["input_ids"]).logits
    ours = lm.apply(adapters, batch)
    assert (ours - theirs).abs().max() <= 1e-5
    loaded, loaded_config = load_adapter(tmp_path / "adapter")
    flat, loaded_flat = T.flatten(adapters), T.flatten(loaded)  # safetensors sorts the names
    assert sorted(flat) == sorted(loaded_flat)
    assert all(torch.equal(flat[k], loaded_flat[k]) for k in flat)
    assert lora_targets(PARAMS, loaded_config) == lm.targets
    assert (loaded_config.rank, loaded_config.scale, loaded_config.use_dora) == (
        config.rank,
        config.scale,
        config.use_dora,
    )


def test_peft_saved_adapter_loads_in_tscale(tmp_path) -> None:
    peft = _peft()
    hf = _hf_model(PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            hf,
            peft.LoraConfig(
                r=4, lora_alpha=16, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"]
            ),
        )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path))
    adapters, config = load_adapter(tmp_path)
    batch = _batch()
    with torch.no_grad():
        theirs = pm.eval()(input_ids=batch["input_ids"]).logits
    ours = LoraModel(apply_fn=MODEL.apply, base=PARAMS, config=config).apply(adapters, batch)
    assert (ours - theirs).abs().max() <= 1e-5


def test_load_adapter_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        load_adapter(tmp_path)
    adapters = init_lora(PARAMS, LoraConfig(rank=2, targets=("q_proj",)), R.key(0))
    save_adapter(adapters, LoraConfig(rank=2, targets=("q_proj",)), tmp_path)
    cfg = (tmp_path / "adapter_config.json").read_text().replace('"bias": "none"', '"bias": "all"')
    (tmp_path / "adapter_config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="bias"):
        load_adapter(tmp_path)
