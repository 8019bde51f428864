"""Schedules: bounds and monotonicity (hypothesis), int/tensor agreement, transformers parity."""

from __future__ import annotations

import functools
import inspect
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale import optim

transformers_optimization = pytest.importorskip("transformers.optimization")

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def cosine_args(draw) -> tuple[float, int, int, float]:
    peak = draw(st.floats(1e-6, 10.0))
    warmup = draw(st.integers(0, 40))
    total = warmup + draw(st.integers(0, 120))
    ratio = draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
    return peak, warmup, total, ratio


@SETTINGS
@given(args=cosine_args())
def test_warmup_cosine_bounded_and_monotone(args) -> None:
    peak, warmup, total, ratio = args
    sched = optim.warmup_cosine(peak, warmup, total, ratio)
    values = [sched(s) for s in range(total + 30)]
    assert all(isinstance(v, float) for v in values)
    tol = peak * 1e-12
    for s, v in enumerate(values):
        low = 0.0 if s < warmup else peak * ratio
        assert low - tol <= v <= peak + tol, (s, v)
    warm, decay = values[: warmup + 1], values[warmup:]
    assert all(a <= b for a, b in itertools.pairwise(warm))
    assert all(a >= b - tol for a, b in itertools.pairwise(decay))
    assert values[warmup] == pytest.approx(peak)
    assert values[-1] == pytest.approx(peak * ratio)


@SETTINGS
@given(args=cosine_args(), step=st.integers(0, 400))
def test_int_and_tensor_steps_agree(args, step: int) -> None:
    peak, warmup, total, ratio = args
    for sched in (
        optim.warmup_cosine(peak, warmup, total, ratio),
        optim.linear_warmup(peak, warmup),
        optim.cosine_decay(peak, max(total, 1), ratio),
        optim.constant(peak),
        optim.join([optim.linear_warmup(peak, warmup), optim.cosine_decay(peak, 10)], [warmup]),
    ):
        v = sched(step)
        t = sched(torch.tensor(step))
        assert isinstance(v, float)
        assert isinstance(t, torch.Tensor) and t.ndim == 0 and t.dtype == torch.float32
        assert float(t) == pytest.approx(v, rel=1e-5, abs=peak * 1e-6)


@pytest.mark.parametrize(("peak", "warmup", "total"), [(1e-3, 10, 100), (3.0, 0, 7), (0.5, 7, 7)])
def test_equals_transformers_cosine_with_warmup(peak: float, warmup: int, total: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = transformers_optimization.get_cosine_schedule_with_warmup(opt, warmup, total)
    sched = optim.warmup_cosine(peak, warmup, total)
    for step in range(total + 1):
        assert sched(step) == ref.get_last_lr()[0], step  # bit-identical on the int path
        assert float(sched(torch.tensor(step))) == pytest.approx(sched(step), abs=peak * 1e-6)
        opt.step()
        ref.step()


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_equals_transformers_cosine_with_min_lr(ratio: float) -> None:
    # transformers' get_cosine_with_min_lr_schedule_with_warmup uses another warmup convention
    # ((s + 1) / warmup); the plain cosine lambda takes min_lr_rate with the same one as ours.
    fn = transformers_optimization._get_cosine_schedule_with_warmup_lr_lambda
    if "min_lr_rate" not in inspect.signature(fn).parameters:
        pytest.skip("this transformers has no min_lr_rate in the cosine lambda")
    peak, warmup, total = 2e-3, 5, 50
    lam = functools.partial(
        fn, num_warmup_steps=warmup, num_training_steps=total, num_cycles=0.5, min_lr_rate=ratio
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    sched = optim.warmup_cosine(peak, warmup, total, ratio)
    for step in range(total + 1):
        assert sched(step) == ref.get_last_lr()[0], step
        opt.step()
        ref.step()


def test_join_semantics() -> None:
    two = optim.join([optim.constant(1.0), optim.constant(2.0)], [5])
    assert [two(s) for s in range(8)] == [1.0] * 5 + [2.0] * 3
    joined = optim.join([optim.linear_warmup(1.0, 10), optim.cosine_decay(1.0, 20, 0.1)], [10])
    whole = optim.warmup_cosine(1.0, 10, 30, 0.1)
    for s in range(40):
        assert joined(s) == whole(s)
        assert float(joined(torch.tensor(s))) == pytest.approx(whole(s), abs=1e-6)
    three = optim.join([optim.constant(1.0), optim.constant(2.0), optim.constant(3.0)], [2, 4])
    assert [three(s) for s in range(6)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert [float(three(torch.tensor(s))) for s in range(6)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_tensor_step_keeps_device_and_int64_counts() -> None:
    step = torch.tensor(3, dtype=torch.int64)
    for sched in (optim.constant(1.0), optim.warmup_cosine(1.0, 2, 10), optim.linear_warmup(1, 5)):
        out = sched(step)
        assert out.device == step.device and out.dtype == torch.float32 and out.ndim == 0


def test_build_schedule() -> None:
    c = optim.build_schedule("constant", 1e-3, warmup_steps=4, total_steps=100)
    assert [c(s) for s in (0, 2, 4, 50, 1000)] == [0.0, 5e-4, 1e-3, 1e-3, 1e-3]
    cos = optim.build_schedule("cosine", 1e-3, warmup_steps=4, total_steps=100, min_lr_ratio=0.1)
    ref = optim.warmup_cosine(1e-3, 4, 100, 0.1)
    assert [cos(s) for s in range(120)] == [ref(s) for s in range(120)]
    with pytest.raises(ValueError, match=r"unknown schedule type 'linear'.*constant, cosine"):
        optim.build_schedule("linear", 1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        optim.build_schedule("cosine", 1e-3)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: optim.constant(-1.0), "value"),
        (lambda: optim.linear_warmup(1.0, -1), "warmup_steps"),
        (lambda: optim.linear_warmup(1.0, 2.5), "warmup_steps"),
        (lambda: optim.cosine_decay(1.0, 0), "decay_steps"),
        (lambda: optim.cosine_decay(1.0, 10, 1.5), "min_ratio"),
        (lambda: optim.warmup_cosine(1.0, 10, 5), "total_steps"),
        (lambda: optim.warmup_cosine(float("nan"), 1, 5), "peak"),
        (lambda: optim.warmup_cosine(1.0, 1, 5, -0.1), "min_lr_ratio"),
        (lambda: optim.join([optim.constant(1.0)], [3]), "boundaries"),
        (lambda: optim.join([optim.constant(1.0), 2.0], [3]), r"schedules\[1\]"),
        (lambda: optim.join([optim.constant(1.0)] * 3, [4, 2]), "non-decreasing"),
    ],
)
def test_schedule_factories_validate_eagerly(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
