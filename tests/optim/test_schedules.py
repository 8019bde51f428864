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
    with pytest.raises(ValueError, match=r"unknown schedule type 'step'.*constant, cosine"):
        optim.build_schedule("step", 1e-3)
    for kind in ("cosine", "cosine_restarts", "linear", "wsd", "rex", "polynomial"):
        with pytest.raises(ValueError, match=f"total_steps is required for a {kind} schedule"):
            optim.build_schedule(kind, 1e-3)


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


# --------------------------------------------------------------------------------------------
# linear, cosine with restarts, wsd, rex, inverse_sqrt, polynomial


def _decaying(kind: str, peak: float, warmup: int, total: int, ratio: float, extra: int):
    """The schedule ``kind`` built with its type-specific argument drawn from ``extra``."""
    if kind == "linear":
        return optim.warmup_linear(peak, warmup, total, ratio)
    if kind == "cosine_restarts":
        return optim.warmup_cosine_restarts(peak, warmup, total, 1 + extra % 4, ratio)
    if kind == "wsd":
        shape = optim.DECAY_SHAPES[extra % 3]
        room = (total - warmup) / max(total, 1)
        return optim.wsd(peak, warmup, total, room * (extra % 5) / 4, shape, ratio)
    if kind == "rex":
        return optim.rex(peak, warmup, total, ratio)
    if kind == "polynomial":
        return optim.polynomial(peak, warmup, total, 0.5 + extra % 3, ratio)
    return optim.inverse_sqrt(peak, warmup, None if extra % 2 else 1 + extra)


DECAYING = ["linear", "cosine_restarts", "wsd", "rex", "polynomial", "inverse_sqrt"]


@SETTINGS
@given(args=cosine_args(), extra=st.integers(0, 100), kind=st.sampled_from(DECAYING))
def test_decaying_schedules_bounded_and_monotone(args, extra: int, kind: str) -> None:
    peak, warmup, total, ratio = args
    sched = _decaying(kind, peak, warmup, total, ratio, extra)
    values = [sched(s) for s in range(total + 30)]
    assert all(isinstance(v, float) for v in values)
    tol = peak * 1e-12
    floor = 0.0 if kind == "inverse_sqrt" else peak * ratio
    for s, v in enumerate(values):
        assert (0.0 if s < warmup else floor) - tol <= v <= peak + tol, (s, v)
    # the peak is reached when warmup ends, unless the decay is over by then (total == warmup)
    peaked = total > warmup or kind == "inverse_sqrt"
    warm, decay = values[: warmup + peaked], values[warmup:]
    assert all(a <= b for a, b in itertools.pairwise(warm))
    if peaked:
        assert values[warmup] == pytest.approx(peak)
    if kind == "inverse_sqrt":
        assert all(v > 0.0 for v in decay)
    else:
        assert values[-1] == pytest.approx(peak * ratio)
    if kind == "cosine_restarts":  # non-increasing within each cycle: count the restarts
        rises = sum(b > a + tol for a, b in itertools.pairwise(decay))
        assert rises <= extra % 4  # num_cycles - 1 restarts
    else:
        assert all(a >= b - tol for a, b in itertools.pairwise(decay))


@SETTINGS
@given(
    args=cosine_args(),
    extra=st.integers(0, 100),
    kind=st.sampled_from(DECAYING),
    step=st.integers(0, 400),
)
def test_decaying_int_and_tensor_steps_agree(args, extra: int, kind: str, step: int) -> None:
    peak, warmup, total, ratio = args
    sched = _decaying(kind, peak, warmup, total, ratio, extra)
    v = sched(step)
    t = sched(torch.tensor(step))
    assert isinstance(t, torch.Tensor) and t.ndim == 0 and t.dtype == torch.float32
    assert float(t) == pytest.approx(v, rel=1e-5, abs=peak * 1e-6)


def _reference(make, peak: float):
    """``step -> lr`` of a transformers LambdaLR schedule: ``base_lr * lambda(step)``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    lam = make(opt).lr_lambdas[0]
    return lambda step: peak * lam(step)


def _assert_equal_from(ours, ref, steps: range) -> None:
    for step in steps:
        assert ours(step) == ref(step), step  # bit-identical on the int path
        assert float(ours(torch.tensor(step))) == pytest.approx(ref(step), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(("warmup", "total"), [(10, 100), (0, 7), (7, 7)])
def test_equals_transformers_linear(warmup: int, total: int) -> None:
    tf = transformers_optimization
    ref = _reference(lambda o: tf.get_linear_schedule_with_warmup(o, warmup, total), 1e-3)
    _assert_equal_from(optim.warmup_linear(1e-3, warmup, total), ref, range(total + 5))


@pytest.mark.parametrize(("warmup", "total", "cycles"), [(10, 100, 1), (5, 64, 3), (0, 30, 4)])
def test_equals_transformers_cosine_hard_restarts(warmup: int, total: int, cycles: int) -> None:
    tf = transformers_optimization
    ref = _reference(
        lambda o: tf.get_cosine_with_hard_restarts_schedule_with_warmup(o, warmup, total, cycles),
        2e-3,
    )
    ours = optim.warmup_cosine_restarts(2e-3, warmup, total, cycles)
    _assert_equal_from(ours, ref, range(total + 5))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize(
    ("warmup", "total", "fraction", "ratio"), [(5, 60, 0.25, 0.0), (3, 41, 0.5, 0.1)]
)
def test_equals_transformers_wsd(shape: str, warmup: int, total: int, fraction, ratio) -> None:
    fn = transformers_optimization.get_wsd_schedule
    params = inspect.signature(fn).parameters
    assert {"num_decay_steps", "num_training_steps", "decay_type", "min_lr_ratio"} <= set(params)
    decay = round(fraction * total)
    ref = _reference(
        lambda o: fn(
            o,
            num_warmup_steps=warmup,
            num_decay_steps=decay,
            num_training_steps=total,
            decay_type=shape,
            min_lr_ratio=ratio,
        ),
        1e-3,
    )
    ours = optim.wsd(1e-3, warmup, total, fraction, shape, ratio)
    # transformers' warmup rises from peak * min_lr_ratio, ours from 0 (as every schedule here)
    _assert_equal_from(ours, ref, range(0 if ratio == 0 else warmup, total + 5))
    assert [ours(s) for s in range(warmup)] == [1e-3 * (s / warmup) for s in range(warmup)]


@pytest.mark.parametrize(("warmup", "timescale"), [(10, None), (0, None), (4, 25), (0, 3)])
def test_equals_transformers_inverse_sqrt(warmup: int, timescale: int | None) -> None:
    tf = transformers_optimization
    ref = _reference(lambda o: tf.get_inverse_sqrt_schedule(o, warmup, timescale), 1e-3)
    _assert_equal_from(optim.inverse_sqrt(1e-3, warmup, timescale), ref, range(200))


@pytest.mark.parametrize(
    ("warmup", "total", "power", "ratio"), [(10, 100, 1.0, 0.0), (3, 30, 2.0, 0.1)]
)
def test_equals_transformers_polynomial(warmup: int, total: int, power: float, ratio) -> None:
    peak = 3e-3
    tf = transformers_optimization
    ref = _reference(
        lambda o: tf.get_polynomial_decay_schedule_with_warmup(
            o, warmup, total, lr_end=peak * ratio, power=power
        ),
        peak,
    )
    _assert_equal_from(optim.polynomial(peak, warmup, total, power, ratio), ref, range(total + 5))


def test_rex_profile() -> None:
    # Chen et al. 2021: (1 - z) / (1/2 + (1 - z)/2); above linear everywhere inside (0, 1)
    sched = optim.rex(1.0, 0, 100)
    for s in range(101):
        z = s / 100
        assert sched(s) == pytest.approx((1 - z) / (0.5 + 0.5 * (1 - z)), abs=1e-15)
        if 0 < s < 100:
            assert sched(s) > 1 - z
    assert optim.rex(2.0, 10, 110, 0.1)(60) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 / 0.75))


def test_every_schedule_record_builds_its_schedule() -> None:
    """Each ``scheduler.type`` record builds the schedule of its factory, bit for bit."""
    fields = {
        "constant": {},
        "cosine": {"min_lr_ratio": 0.1},
        "cosine_restarts": {"num_cycles": 3, "min_lr_ratio": 0.1},
        "linear": {"min_lr_ratio": 0.1},
        "wsd": {"decay_fraction": 0.3, "decay_shape": "cosine", "min_lr_ratio": 0.1},
        "rex": {"min_lr_ratio": 0.1},
        "inverse_sqrt": {"timescale": 20},
        "polynomial": {"power": 2.0, "min_lr_ratio": 0.1},
    }
    expected = {
        "constant": optim.linear_warmup(1e-3, 5),
        "cosine": optim.warmup_cosine(1e-3, 5, 50, 0.1),
        "cosine_restarts": optim.warmup_cosine_restarts(1e-3, 5, 50, 3, 0.1),
        "linear": optim.warmup_linear(1e-3, 5, 50, 0.1),
        "wsd": optim.wsd(1e-3, 5, 50, 0.3, "cosine", 0.1),
        "rex": optim.rex(1e-3, 5, 50, 0.1),
        "inverse_sqrt": optim.inverse_sqrt(1e-3, 5, 20),
        "polynomial": optim.polynomial(1e-3, 5, 50, 2.0, 0.1),
    }
    assert set(expected) == set(fields) == set(optim.SCHEDULES) == set(optim.SCHEDULE_TYPES)
    for kind, ref in expected.items():
        built = optim.SCHEDULE_TYPES[kind](warmup_steps=5, **fields[kind]).build(1e-3, 50)
        assert [built(s) for s in range(60)] == [ref(s) for s in range(60)], kind
        by_name = optim.build_schedule(kind, 1e-3, 5, 50, **fields[kind])
        assert [by_name(s) for s in range(60)] == [ref(s) for s in range(60)], kind
    with pytest.raises(ValueError, match=r"schedule 'constant'.*min_lr_ratio"):
        optim.build_schedule("constant", 1e-3, min_lr_ratio=0.1)
    with pytest.raises(ValueError, match=r"warmup_steps: must be >= 0, got -1"):
        optim.CosineConfig(warmup_steps=-1).build(1e-3, 50)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: optim.warmup_linear(1.0, 10, 5), "total_steps"),
        (lambda: optim.warmup_linear(1.0, 1, 5, 2.0), "min_lr_ratio"),
        (lambda: optim.warmup_cosine_restarts(1.0, 1, 5, 0), "num_cycles"),
        (lambda: optim.warmup_cosine_restarts(1.0, 1, 5, 1.5), "num_cycles"),
        (lambda: optim.wsd(1.0, 1, 10, 1.5), "decay_fraction"),
        (lambda: optim.wsd(1.0, 1, 10, 0.2, "exp"), "decay_shape"),
        (lambda: optim.wsd(1.0, 5, 10, 0.8), r"decay_fraction 0.8 makes 8 decay steps"),
        (lambda: optim.rex(-1.0, 1, 10), "peak"),
        (lambda: optim.inverse_sqrt(1.0, 2, 0), "timescale"),
        (lambda: optim.inverse_sqrt(1.0, -2), "warmup_steps"),
        (lambda: optim.polynomial(1.0, 1, 10, 0.0), "power"),
        (lambda: optim.polynomial(1.0, 1, 10, float("inf")), "power"),
    ],
)
def test_new_schedule_factories_validate_eagerly(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
