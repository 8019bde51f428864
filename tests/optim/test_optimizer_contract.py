"""Every registered optimizer through one contract: built from its config record (clip and
non-finite guard included, as the trainer builds it), init/update keep shapes and dtypes, the
state keeps its structure, params are never written and nothing syncs with the host, an update
on cloned inputs equals the update that consumes its inputs, a tiny transformer learns, and the
record survives the YAML round trip.

The numeric proofs (each optimizer against torch.optim, bitsandbytes or a transcription of its
paper) stay in the per-optimizer files; this file holds what used to be copied across them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict, TensorDictBase

from tscale import optim
from tscale.config import Config, load_config, to_yaml
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import OPTIMIZER_TYPES, OptimizerRecord
from tscale.step import make_train_step
from tscale.step.sophia import make_hessian_estimate
from tscale.testing import assert_transform_contract, assert_trees_equal, trees
from tscale.testing.optim import NAMED_SHAPES, NoHostSync

CASES: dict[str, dict[str, Any]] = {
    # record fields of the tiny run (measured loss over 30 steps: first -> last)
    "adamw": {"lr": 3e-3, "weight_decay": 0.1},  # 3.48 -> 1.26
    "adamw_8bit": {"lr": 3e-3, "weight_decay": 0.1, "min_8bit_size": 16},  # 3.48 -> 1.26
    "lion": {"lr": 3e-3, "weight_decay": 0.1},  # 3.48 -> 1.08
    "prodigy": {"lr": 1.0},  # 3.48 -> 0.32
    "sophia_g": {"lr": 3e-3},  # 3.48 -> 1.07
    "schedule_free_adamw": {"lr": 1e-2},  # 3.48 -> 0.10 (at y)
    "muon": {"lr": 0.02},  # 3.48 -> 0.015
}
NEEDS = {"adamw_8bit": "bitsandbytes"}
NAMES = sorted(CASES)


def _record(name: str, **overrides: Any) -> OptimizerRecord:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    return OPTIMIZER_TYPES[name](**{**CASES[name], **overrides})


def _tx(
    rec: OptimizerRecord, schedule: Any = None, *, as_on_device: bool = False
) -> optim.GradientTransformation:
    """The record's transform; ``as_on_device``: its non-finite guard as on an accelerator
    (selects on the device; with CPU tensors it reads its flag on the host)."""
    lr = rec.lr if schedule is None else schedule
    if as_on_device and rec.skip_nonfinite:
        inner = _tx(attrs.evolve(rec, skip_nonfinite=False), schedule)
        return optim.skip_nonfinite(inner, select_on_device=True)
    if rec.capabilities.replaces_schedule:
        return rec.build(rec.lr, warmup_steps=2)
    return rec.build(lr)


def _extra(rec: OptimizerRecord, params: TensorDictBase, g: torch.Generator) -> dict[str, Any]:
    """The extra arguments of ``update`` the optimizer's capabilities ask for."""
    if rec.capabilities.needs_objective:  # Sophia-G: a positive Hessian diagonal estimate
        return {"hessian": params.apply(lambda p: torch.rand(p.shape, generator=g).to(p.dtype))}
    return {}


def _with_extra(
    tx: optim.GradientTransformation, rec: OptimizerRecord, params: TensorDictBase, seed: int
) -> optim.GradientTransformation:
    """``tx`` with its extra arguments drawn at each update (for the generic contract helper)."""
    g = torch.Generator().manual_seed(seed)

    def update(updates, state, p=None):
        return tx.update(updates, state, p, **_extra(rec, params, g))

    return optim.GradientTransformation(tx.init, update)


def _params(dtype: torch.dtype, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return T.unflatten({k: torch.randn(s, generator=g).to(dtype) for k, s in NAMED_SHAPES.items()})


def test_every_registered_optimizer_has_a_case() -> None:
    assert set(CASES) == set(OPTIMIZER_TYPES) == set(optim.OPTIMIZERS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_update_contract_without_host_sync(name: str, dtype: torch.dtype) -> None:
    """Shapes and dtypes of the updates are the gradients', the state keeps its structure and
    stores no half-precision moments, params are never written, no host sync, finite; the
    params to evaluate have the params' shapes and dtypes."""
    rec = _record(name)
    params = _params(dtype)
    tx = _tx(rec, optim.warmup_cosine(rec.lr, 2, 6), as_on_device=True)
    state = tx.init(params)
    sig = [(k, t.shape, t.dtype) for k, t in zip(T.leaf_keys(state), T.leaves(state), strict=True)]
    assert not any(t.dtype in (torch.bfloat16, torch.float16) for t in T.leaves(state))
    before = params.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = params.apply(lambda p: torch.randn(p.shape, generator=g).to(p.dtype))
        grad_sig = [(t.shape, t.dtype) for t in T.leaves(grads)]
        extra = _extra(rec, params, g)
        with NoHostSync():
            updates, state = tx.update(grads, state, params, **extra)
        assert [(t.shape, t.dtype) for t in T.leaves(updates)] == grad_sig
        assert [
            (k, t.shape, t.dtype) for k, t in zip(T.leaf_keys(state), T.leaves(state), strict=True)
        ] == sig
        assert_trees_equal(params, before)
        assert all(bool(torch.isfinite(u).all()) for u in T.leaves(updates))
    with NoHostSync():
        evaluated = rec.params_to_evaluate(params, state)
    assert [(t.shape, t.dtype) for t in T.leaves(evaluated)] == [
        (t.shape, t.dtype) for t in T.leaves(params)
    ]


@settings(max_examples=6, deadline=None)
@given(
    params=trees(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(NAMES),
)
def test_contract_on_random_trees(params: TensorDict, seed: int, name: str) -> None:
    rec = _record(name)
    tx = _with_extra(_tx(rec), rec, params, seed)
    assert_transform_contract(tx, params, steps=3, seed=seed, check_finite=False)


@pytest.mark.parametrize("name", NAMES)
def test_update_on_clones_equals_the_consuming_update(name: str) -> None:
    """Pure: an update that consumes its inputs (the donated step) and one given clones (the
    non-donated step) give bit-identical updates and states, and the clones' sources stay."""
    rec = _record(name)
    tx = _tx(rec)
    params = _params(torch.float32)
    g = torch.Generator().manual_seed(2)
    grads = [params.apply(lambda p: torch.randn(p.shape, generator=g)) for _ in range(3)]
    extras = [_extra(rec, params, g) for _ in range(3)]

    def run(clone: bool) -> tuple[list[TensorDictBase], TensorDictBase]:
        state, out = tx.init(params), []
        for grad, extra in zip(grads, extras, strict=True):
            if clone:
                kept = (grad.clone(), state.clone())
                extra = {k: v.clone() for k, v in extra.items()}
                u, new = tx.update(grad.clone(), state.clone(), params.clone(), **extra)
                assert_trees_equal(grad, kept[0])
                assert_trees_equal(state, kept[1])
            else:
                u, new = tx.update(
                    grad.clone(), state, params, **{k: v.clone() for k, v in extra.items()}
                )
            out.append(u.clone())
            state = new
        return out, state

    consumed, consumed_state = run(clone=False)
    cloned, cloned_state = run(clone=True)
    for a, b in zip(consumed, cloned, strict=True):
        assert_trees_equal(a, b)
    assert_trees_equal(consumed_state, cloned_state)


_CFG = TransformerConfig(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
)
_MODEL = Transformer(_CFG)


def _batch() -> TensorDict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _CFG.vocab_size, (8, 16), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[8])


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_transformer_learns(name: str) -> None:
    """30 steps on one batch through make_train_step (with the update's extra arguments when
    the optimizer needs the objective): the loss falls by 30% or more, also at the params the
    optimizer says to evaluate."""
    rec = _record(name)
    tx = _tx(rec)
    params = _MODEL.init(R.key(0))
    state = TrainState.create(params, tx.init(params), R.key(1))
    extra = make_hessian_estimate(_MODEL.apply) if rec.capabilities.needs_objective else None
    loss_fn = make_lm_loss(_MODEL.apply)
    step = make_train_step(loss_fn, tx, update_extra=extra)
    batch = _batch()
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] <= 0.7 * losses[0], losses
    evaluated = rec.params_to_evaluate(state.params, state.opt_state)
    with torch.no_grad():
        loss_sum, aux = loss_fn(evaluated, batch)
    assert float(loss_sum / aux["tokens"]) <= 0.7 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_record_round_trips_through_yaml(name: str) -> None:
    rec = OPTIMIZER_TYPES[name](**CASES[name])
    cfg = Config(optimizer=rec)
    assert load_config(yaml.safe_load(to_yaml(cfg))) == cfg
    assert load_config({"optimizer": {"type": name}}).optimizer == OPTIMIZER_TYPES[name]()
    assert load_config({"optimizer": CASES[name] | {"type": name}}).optimizer == rec


@pytest.mark.parametrize("name", NAMES)
def test_the_clip_joins_the_optimizer_chain(name: str) -> None:
    """One flat chain whether or not the builder clips: the clip's state first, then the
    optimizer's members as without it (checkpoints keep one layout)."""
    rec = _record(name)
    params = _params(torch.float32)
    bare = rec.build(1e-3, clip=False).init(params)["inner"]
    clipped = rec.build(1e-3).init(params)["inner"]
    assert list(clipped.keys()) == [str(i) for i in range(len(bare.keys()) + 1)]
    assert T.leaf_keys(clipped["0"]) == []  # the clip is stateless
    for i in range(len(bare.keys())):
        assert T.leaf_keys(clipped[str(i + 1)]) == T.leaf_keys(bare[str(i)])


def _capability(name: str) -> Callable[[str], bool]:
    return lambda t: getattr(OPTIMIZER_TYPES[t].capabilities, name)


def test_capabilities_are_data() -> None:
    """The special cases the trainer and the parallel wrappers read, by capability."""
    assert set(filter(_capability("needs_objective"), NAMES)) == {"sophia_g"}
    assert set(filter(_capability("eval_params"), NAMES)) == {"schedule_free_adamw"}
    assert set(filter(_capability("replaces_schedule"), NAMES)) == {"schedule_free_adamw"}
    assert set(filter(_capability("needs_full_tensors"), NAMES)) == {"muon"}
    assert {n for n in NAMES if not _capability("elementwise")(n)} == {"muon", "prodigy"}
