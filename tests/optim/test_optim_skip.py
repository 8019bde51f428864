"""skip_nonfinite: a NaN/inf step leaves params and the inner state bit-identical, on device."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale import optim
from tscale.core import tree as T
from tscale.testing import assert_trees_equal, float_dtypes, trees
from tscale.testing.optim import NoHostSync

SETTINGS = settings(max_examples=25, deadline=None)


def _adamw() -> optim.GradientTransformation:
    sched = optim.warmup_cosine(1e-2, 2, 10, 0.1)
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched, weight_decay=0.1))


def _grads(params: TensorDict, seed: int, steps: int) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    return [
        params.apply(lambda p: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        for _ in range(steps)
    ]


def _poison(grad: TensorDict, leaf: int, value: float) -> TensorDict:
    grad = grad.clone()
    t = T.leaves(grad)[leaf % len(T.leaves(grad))]
    t.view(-1)[0] = value  # a 0-d leaf views as one element
    return grad


def _run(tx, params: TensorDict, grads: list[TensorDict]) -> tuple[TensorDict, TensorDict]:
    params = params.clone()
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad.clone(), state, params)
        optim.apply_updates(params, updates)
    return params, state


@SETTINGS
@given(
    params=trees(dtype=float_dtypes(include_half=True)),
    seed=st.integers(0, 2**16),
    leaf=st.integers(0, 10),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    on_device=st.booleans(),
)
def test_nonfinite_step_is_dropped_bit_for_bit(
    params, seed: int, leaf: int, bad: float, on_device: bool
) -> None:
    grads = _grads(params, seed, 4)
    tx = optim.skip_nonfinite(_adamw(), select_on_device=on_device)
    # the clean run, and the same run with a poisoned gradient inserted at step 2
    clean_params, clean_state = _run(tx, params, grads)
    poisoned = [*grads[:2], _poison(grads[2], leaf, bad), *grads[2:]]
    p, state = params.clone(), tx.init(params)
    for step, grad in enumerate(poisoned):
        before_p, before_inner = p.clone(), state["inner"].clone()
        updates, state = tx.update(grad.clone(), state, p)
        optim.apply_updates(p, updates)
        if step == 2:
            assert_trees_equal(p, before_p)  # params bit-identical (signed zeros included)
            assert_trees_equal(state["inner"], before_inner)  # moments and counts untouched
            assert int(state["skipped"]) == 1
    assert int(state["skipped"]) == 1
    assert_trees_equal(p, clean_params)  # the dropped step left no trace
    assert_trees_equal(state["inner"], clean_state["inner"])


@SETTINGS
@given(
    params=trees(dtype=float_dtypes(include_half=True)),
    seed=st.integers(0, 2**16),
    on_device=st.booleans(),
)
def test_finite_steps_equal_the_unwrapped_optimizer(params, seed: int, on_device: bool) -> None:
    grads = _grads(params, seed, 3)
    tx = optim.skip_nonfinite(_adamw(), select_on_device=on_device)
    wrapped_params, wrapped_state = _run(tx, params, grads)
    plain_params, plain_state = _run(_adamw(), params, grads)
    assert_trees_equal(wrapped_params, plain_params)
    assert_trees_equal(wrapped_state["inner"], plain_state)
    assert int(wrapped_state["skipped"]) == 0


def test_signed_zero_params_survive_a_skipped_step() -> None:
    params = T.unflatten({"w": torch.tensor([-0.0, 0.0, 1.0])})
    tx = optim.skip_nonfinite(optim.adamw(1e-2))
    state = tx.init(params)
    updates, state = tx.update(T.unflatten({"w": torch.tensor([1.0, float("nan"), 1.0])}), state)
    optim.apply_updates(params, updates)
    assert torch.equal(
        params["w"].view(torch.int32), torch.tensor([-0.0, 0.0, 1.0]).view(torch.int32)
    )


@pytest.mark.parametrize("on_device", [True, False])
def test_nonfinite_updates_from_finite_grads_are_dropped(on_device: bool) -> None:
    # the inner transform overflows float32: the check runs on its output too
    params = T.unflatten({"w": torch.ones(3)})
    inner = optim.chain(optim.scale(1e30), optim.scale(1e30))
    tx = optim.skip_nonfinite(inner, select_on_device=on_device)
    state = tx.init(params)
    updates, state = tx.update(T.unflatten({"w": torch.ones(3)}), state, params)
    assert torch.equal(updates["w"], torch.zeros(3)) and int(state["skipped"]) == 1


def test_eight_bit_state_is_kept() -> None:
    pytest.importorskip("bitsandbytes")
    params = T.unflatten({"w": torch.randn(64, 80), "b": torch.randn(5)})
    tx = optim.skip_nonfinite(optim.adamw_8bit(1e-3, weight_decay=0.1))
    state = tx.init(params)
    for grad in _grads(params, 0, 2):
        _, state = tx.update(grad, state, params)
    before = state["inner"].clone()
    _, state = tx.update(_poison(_grads(params, 1, 1)[0], 0, float("nan")), state, params)
    assert_trees_equal(state["inner"], before)
    assert state["inner", "0", "state1", "w"].dtype == torch.uint8


def test_no_host_sync_on_device() -> None:
    # CPU tensors stand in for an accelerator's: the device path reads no flag on the host
    params = T.unflatten({"a.w": torch.randn(4, 3), "b": torch.randn(3, dtype=torch.bfloat16)})
    tx = optim.skip_nonfinite(_adamw(), select_on_device=True)
    state = tx.init(params)
    for step, grad in enumerate(_grads(params, 0, 4)):
        grad = _poison(grad, 0, float("nan")) if step == 1 else grad
        with NoHostSync():
            updates, state = tx.update(grad, state, params)
            optim.apply_updates(params, updates)
            skipped = optim.skipped_steps(state)
    assert int(skipped) == 1


def test_plain_cpu_tensors_read_the_flag_and_skip_the_selects() -> None:
    params = T.unflatten({"w": torch.randn(4, 3)})
    tx = optim.skip_nonfinite(_adamw())  # auto: plain CPU tensors
    state = tx.init(params)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        tx.update(_grads(params, 0, 1)[0], state, params)


def test_skipped_steps_reads_any_depth() -> None:
    params = T.unflatten({"w": torch.ones(2)})
    assert optim.skipped_steps(optim.adamw(1e-3).init(params)) is None
    nested = optim.chain(optim.skip_nonfinite(optim.scale(1.0)), optim.skip_nonfinite(_adamw()))
    state = nested.init(params)
    state["0", "skipped"].fill_(2)
    state["1", "skipped"].fill_(3)
    total = optim.skipped_steps(state)
    assert total.dtype == torch.int64 and total.ndim == 0 and int(total) == 5
    assert int(state["0", "skipped"]) == 2  # a copy: the counters are not modified


def test_validation() -> None:
    with pytest.raises(ValueError, match="did you pass the factory"):
        optim.skip_nonfinite(optim.adamw)
