"""make_train_step: accumulation equals the big batch, donation is invisible, no host syncs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode

from tscale.core import rng as R
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import adamw, chain, clip_by_global_norm, warmup_cosine
from tscale.step import make_train_step
from tscale.testing import assert_no_alias, assert_trees_close, assert_trees_equal

CFG = TransformerConfig(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    init_std=0.05,
)
MODEL = Transformer(CFG)


def _state(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[TrainState, object]:
    tx = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(1e-2, 2, 10), weight_decay=0.1))
    params = MODEL.init(R.key(seed)).apply(lambda t: t.to(dtype))
    return TrainState.create(params, tx.init(params), R.key(seed + 1)), tx


def _batch(b: int = 8, s: int = 12, seed: int = 0, masked: float = 0.3) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (b, s), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[torch.rand(b, s, generator=g) < masked] = -100  # uneven token counts per microbatch
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _run(state, tx, step_kwargs, batches):
    step = make_train_step(make_lm_loss(MODEL.apply), tx, **step_kwargs)
    losses = []
    for batch in batches:
        state, m = step(state, batch)
        losses.append(m["loss"])
    return state, torch.stack(losses)


@pytest.mark.parametrize("k", [2, 4])
def test_microbatched_step_equals_one_big_batch(k):
    """float64: accumulation over k microbatches = the big-batch step (token-sum normalisation)."""
    batches = [_batch(seed=i) for i in range(3)]
    s1, tx = _state(torch.float64)
    s2, _ = _state(torch.float64)
    big, big_losses = _run(s1, tx, {"microbatches": 1}, batches)
    acc, acc_losses = _run(s2, tx, {"microbatches": k}, batches)
    torch.testing.assert_close(acc_losses, big_losses, rtol=0, atol=1e-12)
    assert_trees_close(acc.params, big.params, rtol=0, atol=1e-10)
    assert_trees_close(acc.opt_state, big.opt_state, rtol=0, atol=1e-10)


def test_mean_of_microbatch_means_would_differ():
    """The test above can fail: per-microbatch averaging gives a different loss on this data."""
    batch = _batch(seed=0)
    s, _ = _state(torch.float64)
    loss_fn = make_lm_loss(MODEL.apply)
    parts = batch.split(4, dim=0)
    sums = [loss_fn(s.params, p) for p in parts]
    naive = torch.stack([ls / aux["tokens"] for ls, aux in sums]).mean()
    right = sum(ls for ls, _ in sums) / sum(aux["tokens"] for _, aux in sums)
    assert abs(float(naive - right)) > 1e-4


def test_donated_equals_non_donated_bitwise():
    batches = [_batch(seed=i) for i in range(3)]
    s_don, tx = _state()
    s_keep, _ = _state()
    original = s_keep.clone()
    don, don_losses = _run(s_don, tx, {"donate": True}, batches)
    step = make_train_step(make_lm_loss(MODEL.apply), tx, donate=False)
    keep, losses = s_keep, []
    for b in batches:
        new, m = step(keep, b)
        assert_no_alias(new, keep)  # the argument is left intact ...
        keep = new
        losses.append(m["loss"])
    assert_trees_equal(s_keep, original)  # ... and unchanged
    assert_trees_equal(keep, don)
    assert torch.equal(torch.stack(losses), don_losses)


def test_donated_step_reuses_the_param_storage():
    s, tx = _state()
    ptrs = [t.data_ptr() for t in s.params.values(True, True)]
    new, _ = make_train_step(make_lm_loss(MODEL.apply), tx)(s, _batch())
    assert [t.data_ptr() for t in new.params.values(True, True)] == ptrs
    assert int(new.step) == 1


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (``.item()``, ``bool(t)``, …)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host sync inside the step: {func}")
        return func(*args, **(kwargs or {}))


def test_step_does_no_host_sync():
    s, tx = _state()
    step = make_train_step(make_lm_loss(MODEL.apply), tx, microbatches=2)
    batch = _batch()
    with _NoHostSync():
        s, metrics = step(s, batch)
    assert set(metrics) == {"loss", "tokens", "grad_norm"}
    assert all(isinstance(v, torch.Tensor) for v in metrics.values())


def test_no_host_sync_detector_detects():
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        float(torch.ones(()) * 2)


def test_indivisible_microbatches_is_a_clear_error():
    s, tx = _state()
    step = make_train_step(make_lm_loss(MODEL.apply), tx, microbatches=3)
    with pytest.raises(ShapeError, match=r"multiple of train\.microbatches"):
        step(s, _batch(b=8))


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2]), st.integers(0, 100))
def test_property_accumulation_equals_big_batch(n_steps, k, seed):
    batches = [_batch(b=4, s=6, seed=seed + i, masked=0.5) for i in range(n_steps)]
    s1, tx = _state(torch.float64, seed=seed % 3)
    s2, _ = _state(torch.float64, seed=seed % 3)
    a, _ = _run(s1, tx, {"microbatches": 1}, batches)
    b, _ = _run(s2, tx, {"microbatches": k}, batches)
    assert_trees_close(b.params, a.params, rtol=0, atol=1e-10)


def test_all_masked_batch_takes_a_finite_step():
    s, tx = _state()
    batch = _batch()
    batch["labels"][:] = -100
    _, m = make_train_step(make_lm_loss(MODEL.apply), tx)(s, batch)
    assert int(m["tokens"]) == 0 and torch.isfinite(m["loss"]) and float(m["grad_norm"]) == 0.0


def test_nonfinite_step_is_skipped_on_device_and_counted():
    from tscale.optim import skip_nonfinite

    tx = skip_nonfinite(adamw(1e-2, weight_decay=0.1), select_on_device=True)  # as on a GPU
    params = MODEL.init(R.key(0))
    state = TrainState.create(params, tx.init(params), R.key(1))
    base = make_lm_loss(MODEL.apply)

    def loss_fn(p, batch):
        loss_sum, aux = base(p, batch)
        poison = batch["poison"].to(loss_sum.dtype).sum()  # NaN when the batch is poisoned
        return loss_sum * (1 + poison), aux

    step = make_train_step(loss_fn, tx)
    good, bad = _batch(seed=1), _batch(seed=2)
    good["poison"] = torch.zeros(8)
    bad["poison"] = torch.full((8,), float("nan"))
    state, m1 = step(state, good)
    before = state.clone()
    with _NoHostSync():
        state, m2 = step(state, bad)
    assert int(m1["skipped"]) == 0 and int(m2["skipped"]) == 1
    assert_trees_equal(state.params, before.params)
    state, m3 = step(state, good)
    assert int(m3["skipped"]) == 1 and torch.isfinite(m3["loss"])
    assert all(
        torch.isfinite(t).all() for t in state.opt_state.values(True, True) if t.is_floating_point()
    )
