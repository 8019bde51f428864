"""sophia_g and its Hessian estimate: the update against a per-tensor transcription of Liu et al.
(2023), Algorithm 3, the Gauss-Newton-Bartlett estimate (Algorithm 2), passed to the update as an
extra argument by make_train_step's hook, against a direct computation, the Hessian schedule, the
clipping bound and the absence of host syncs (the generic contract and a tiny training run:
tests/optim/test_optimizer_contract.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale import optim
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.sophia import hessian_due, sophia_g
from tscale.step import make_train_step
from tscale.step.sophia import make_hessian_estimate, sample_categorical, uniform
from tscale.testing import assert_no_alias, assert_trees_close, assert_trees_equal, trees
from tscale.testing.optim import DECAYED, NoHostSync
from tscale.testing.optim import NAMED_SHAPES as SHAPES

STEPS = 12
ATOL = 1e-10
CFG = TransformerConfig(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
)
MODEL = Transformer(CFG)


# --------------------------------------------------------------------------------------------
# the transform


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)

    def tree(scale: float = 1.0, positive: bool = False) -> TensorDict:
        flat = {
            k: torch.randn(s, generator=g, dtype=torch.float64) * scale for k, s in SHAPES.items()
        }
        return T.unflatten({k: v.abs() if positive else v for k, v in flat.items()})

    params = tree()
    grads = [tree() for _ in range(STEPS)]
    # Hessian estimates spanning small and large curvature, so that some elements clip and
    # some do not.
    hhats = [tree(scale=30.0, positive=True) for _ in range(STEPS)]
    return params, {k: v.clone() for k, v in T.flatten(params).items()}, grads, hhats


def _reference(
    params,
    grads,
    hhats,
    k,
    lr_at,
    *,
    b1=0.965,
    b2=0.99,
    rho=0.04,
    eps=1e-15,
    wd=0.1,
    decayed=DECAYED,
):
    """Algorithm 3 of the paper, one tensor at a time (steps t = 0, 1, ...)."""
    m = {n: torch.zeros_like(v) for n, v in params.items()}
    h = {n: torch.zeros_like(v) for n, v in params.items()}
    for t, (grad, hhat) in enumerate(zip(grads, hhats, strict=True)):
        lr = lr_at(t)
        g, e = T.flatten(grad), T.flatten(hhat)
        for n, p in params.items():
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            if t % k == 0:
                h[n] = b2 * h[n] + (1 - b2) * e[n]
            lam = wd if n in decayed else 0.0
            ratio = torch.clamp(m[n] / torch.clamp(rho * h[n], min=eps), -1.0, 1.0)
            params[n] = p - lr * (ratio + lam * p)
    return params


def _run(tx, params, grads, hhats):
    state = tx.init(params)
    for grad, hhat in zip(grads, hhats, strict=True):
        updates, state = tx.update(grad.clone(), state, params, hessian=hhat.clone())
        params = optim.apply_updates(params, updates)
    return params, state


def _max_diff(params: TensorDict, ref: dict[str, torch.Tensor]) -> float:
    flat = T.flatten(params)
    return max(float((flat[k] - ref[k]).abs().max()) for k in ref)


@pytest.mark.parametrize(
    ("k", "kwargs"),
    [
        (1, {}),
        (3, {"weight_decay": 0.0, "rho": 0.5}),
        (4, {"mask": None, "b1": 0.9, "b2": 0.95, "eps": 1e-3}),
    ],
)
def test_sophia_matches_paper_transcription(k: int, kwargs: dict) -> None:
    params, ref, grads, hhats = _setup(k)
    out, state = _run(sophia_g(1e-2, update_every=k, **kwargs), params, grads, hhats)
    assert set(state["0"].keys()) == {"mu", "hessian", "count", "hessian_due"}
    rk = {n: kwargs[n] for n in ("b1", "b2", "rho", "eps") if n in kwargs}
    decayed = set(SHAPES) if kwargs.get("mask", "default") is None else DECAYED
    expected = _reference(
        ref,
        grads,
        hhats,
        k,
        lambda t: 1e-2,
        wd=kwargs.get("weight_decay", 0.1),
        decayed=decayed,
        **rk,
    )
    assert _max_diff(out, expected) <= ATOL  # measured: <= 2.2e-16 over all cases


def test_sophia_schedule_matches_paper_transcription() -> None:
    params, ref, grads, hhats = _setup(5)
    sched = optim.warmup_cosine(2e-2, warmup_steps=3, total_steps=STEPS, min_lr_ratio=0.1)
    out, _ = _run(sophia_g(sched, weight_decay=0.2, update_every=2), params, grads, hhats)
    expected = _reference(ref, grads, hhats, 2, lambda t: float(sched(torch.tensor(t))), wd=0.2)
    assert _max_diff(out, expected) <= ATOL


def test_sophia_hand_made_step() -> None:
    """m = 0.1 g; h = 0.01 hhat; m / max(h, eps) clipped to [-1, 1] (rho 1, lr 0.1, no decay)."""
    params = T.unflatten({"w": torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)})
    g = T.unflatten({"w": torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)})
    hhat = T.unflatten({"w": torch.tensor([4.0, 0.0, 1.0, 100.0], dtype=torch.float64)})
    tx = sophia_g(0.1, b1=0.9, b2=0.99, rho=1.0, weight_decay=0.0)
    state = tx.init(params)
    assert bool(hessian_due(state))
    u, state = tx.update(g, state, params, hessian=hhat)
    assert not bool(hessian_due(state))  # update_every = 10: due again at update 10
    # ratios: 0.1/0.04 -> 1, -0.1/1e-15 -> -1, 0/0.01 = 0, 0.2/1 = 0.2
    expected = -0.1 * torch.tensor([1.0, -1.0, 0.0, 0.2], dtype=torch.float64)
    torch.testing.assert_close(u["w"], expected, rtol=0, atol=1e-15)
    h = torch.tensor([0.04, 0.0, 0.01, 1.0], dtype=torch.float64)
    torch.testing.assert_close(state["0"]["hessian"]["w"], h, rtol=0, atol=1e-15)


def test_sophia_refuses_an_update_without_the_estimate() -> None:
    params, _, grads, _ = _setup(0)
    tx = sophia_g(1e-3)
    with pytest.raises(ValueError, match=r"hessian=estimate.*update_extra"):
        tx.update(grads[0], tx.init(params), params)
    with pytest.raises(ValueError, match="exactly one Sophia state"):
        hessian_due(optim.adamw(1e-3).init(params))


def test_sophia_validation_names_the_argument() -> None:
    for kwargs, name in [
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.5}, "b2"),
        ({"rho": 0.0}, "rho"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ]:
        with pytest.raises(ValueError, match=name):
            sophia_g(**{"learning_rate": 1e-3, **kwargs})
    with pytest.raises(ValueError, match="update_every"):
        sophia_g(1e-3, update_every=0)


@settings(max_examples=15, deadline=None)
@given(
    params=trees(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
    seed=st.integers(0, 2**16),
)
def test_sophia_properties(params: TensorDict, seed: int) -> None:
    """Shapes/dtypes kept, state structure stable, params untouched, |update| <= lr (+ decay)."""
    lr, wd = 1e-2, 0.1
    tx = sophia_g(lr, weight_decay=wd, mask=None, update_every=2)
    state = tx.init(params)

    def sig(td: TensorDict) -> list:
        return [
            (k, tuple(t.shape), t.dtype) for k, t in zip(T.leaf_keys(td), T.leaves(td), strict=True)
        ]

    state_sig, before = sig(state), params.clone()
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        grad = params.apply(lambda p: torch.randn(p.shape, generator=g).to(p.dtype))
        hhat = params.apply(lambda p: torch.rand(p.shape, generator=g).to(p.dtype))
        grad_sig = sig(grad)
        u, state = tx.update(grad, state, params, hessian=hhat)
        assert sig(u) == grad_sig and sig(state) == state_sig
        for a, b in zip(T.leaves(params), T.leaves(before), strict=True):
            assert torch.equal(a, b)
        for du, p in zip(T.leaves(u), T.leaves(params), strict=True):
            bound = lr * (1 + wd * p.double().abs()) * (1 + 1e-2) + 1e-12  # 1% for bfloat16
            assert bool((du.double().abs() <= bound).all())


# --------------------------------------------------------------------------------------------
# the step


def _batch(b: int = 8, s: int = 16, seed: int = 0, masked: float = 0.0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (b, s), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[torch.rand(b, s, generator=g) < masked] = -100
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


def _step(tx, *, microbatches: int = 1, donate: bool = True, host_branch: bool = False):
    """The generic train step with Sophia's Hessian estimate as the update's extra argument."""
    estimate = make_hessian_estimate(
        MODEL.apply, microbatches=microbatches, host_branch=host_branch
    )
    loss_fn = make_lm_loss(MODEL.apply)
    return make_train_step(
        loss_fn, tx, microbatches=microbatches, donate=donate, update_extra=estimate
    )


def _state(tx, dtype: torch.dtype = torch.float32, seed: int = 0) -> TrainState:
    params = MODEL.init(R.key(seed)).apply(lambda t: t.to(dtype))
    return TrainState.create(params, tx.init(params), R.key(seed + 1))


def test_sampler_follows_the_softmax() -> None:
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0, 0.5], dtype=torch.float64)
    n = 200_000
    u = uniform(R.key(3), (n,))
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    y = sample_categorical(logits.expand(n, -1), u)
    freq = torch.bincount(y, minlength=6).double() / n
    # 200k draws: the standard error of each frequency is <= 0.0012.
    torch.testing.assert_close(freq, torch.softmax(logits, -1), rtol=0, atol=0.006)
    assert int((y == 4).sum()) == 0  # probability 1e-14: never drawn here
    assert torch.equal(uniform(R.key(3), (n,)), u)  # a pure function of the key
    assert not torch.equal(uniform(R.key(4), (n,)), u)


def test_gnb_estimate_matches_direct_computation() -> None:
    """After step 0 the Hessian EMA is (1 - b2) * N * ghat^2, ghat the mean-CE gradient against
    labels sampled from the model's softmax with the step's key (float64 params)."""
    tx = sophia_g(1e-3, b2=0.9)
    state = _state(tx, torch.float64)
    batch = _batch(masked=0.3)
    params = state.params.clone()
    # The reference: logits, sample, mean CE over the trained tokens, autograd, N ghat^2.
    labels = batch["labels"]
    u = uniform(R.fold_in(state.rng, torch.tensor(0)), tuple(labels.shape))
    leaves = [p.detach().requires_grad_(True) for p in T.leaves(params)]
    live = T.unflatten(dict(zip(T.leaf_keys(params), leaves, strict=True)))
    logits = MODEL.apply(live, batch)
    probs = torch.softmax(logits.detach(), -1)
    cdf = probs.cumsum(-1)
    yhat = (cdf <= (u * cdf[..., -1]).unsqueeze(-1)).sum(-1).clamp_max(CFG.vocab_size - 1)
    trained = labels != -100
    n = int(trained.sum())
    logp = torch.log_softmax(logits, -1).gather(-1, yhat.unsqueeze(-1)).squeeze(-1)
    # ghat = grad(sum) / N rather than grad(sum / N): the model's RMSNorm runs in float32 even
    # for float64 params (as HF's), so gradients of losses scaled differently differ by ~1e-7.
    loss_sum = -(logp * trained).sum()
    ghat = [g / n for g in torch.autograd.grad(loss_sum, leaves)]
    expected = {k: 0.1 * n * g * g for k, g in zip(T.leaf_keys(params), ghat, strict=True)}

    step = _step(tx)
    assert bool(hessian_due(state.opt_state))
    state, _ = step(state, batch)
    got = T.flatten(state.opt_state["0"]["hessian"])
    diff = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert diff <= ATOL  # measured: 1.4e-17
    assert max(float(v.abs().max()) for v in expected.values()) > 1e-6  # not trivially zero


def test_hessian_ema_changes_only_every_update_every_steps() -> None:
    tx = sophia_g(1e-3, update_every=3)
    state = _state(tx)
    step = _step(tx)
    changed, flags = [], []
    for i in range(7):
        before = state.opt_state["0"]["hessian"].clone()
        flags.append(float(hessian_due(state.opt_state)))
        state, _ = step(state, _batch(seed=i))
        after = state.opt_state["0"]["hessian"]
        changed.append(
            not all(
                torch.equal(a, b) for a, b in zip(T.leaves(after), T.leaves(before), strict=True)
            )
        )
    assert changed == [True, False, False, True, False, False, True]
    assert flags == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_sophia_step_update_never_exceeds_lr_plus_decay() -> None:
    lr, wd = 1e-2, 0.1
    tx = sophia_g(lr, weight_decay=wd, rho=1e-4, update_every=2)  # small rho: most clip
    state = _state(tx, torch.float64)
    step = _step(tx)
    for i in range(4):
        before = state.params.clone()
        state, _ = step(state, _batch(seed=i))
        for n, new, old in zip(
            T.leaf_keys(before), T.leaves(state.params), T.leaves(before), strict=True
        ):
            lam = wd if optim.default_decay_mask(n, old) else 0.0
            assert bool(((new - old).abs() <= lr * (1 + lam * old.abs()) + 1e-15).all()), n
    assert any(
        bool(((a - b).abs() > 0.99 * lr).any())
        for a, b in zip(T.leaves(state.params), T.leaves(before), strict=True)
    )  # the bound is reached


def test_sophia_step_has_no_host_sync() -> None:
    tx = optim.chain(
        optim.clip_by_global_norm(1.0), sophia_g(optim.warmup_cosine(1e-2, 2, 10), update_every=2)
    )
    state = _state(tx)
    step = _step(tx, microbatches=2)
    for i in range(3):
        with NoHostSync():
            state, metrics = step(state, _batch(seed=i, masked=0.2))
    assert set(metrics) == {"loss", "tokens", "grad_norm"}
    assert all(isinstance(v, torch.Tensor) for v in metrics.values())


def test_host_branch_microbatches_and_donation_agree() -> None:
    """host_branch=True, microbatches=2 and donate=False all give the default step's states
    (bitwise for the first two modes of the same arithmetic; 1e-10 across microbatching)."""
    tx = sophia_g(1e-2, update_every=2)
    batches = [_batch(seed=i, masked=0.3) for i in range(4)]

    def run(**kw) -> TrainState:
        state = _state(tx, torch.float64)
        step = _step(tx, **kw)
        for b in batches:
            state, _ = step(state, b)
        return state

    base = run()
    assert_trees_equal(run(host_branch=True), base)
    assert_trees_close(run(microbatches=2), base, rtol=0, atol=1e-10)
    kept = _state(tx, torch.float64)
    original = kept.clone()
    step = _step(tx, donate=False)
    new, _ = step(kept, batches[0])
    assert_no_alias(new, kept)
    assert_trees_equal(kept, original)


def test_sophia_step_under_skip_nonfinite() -> None:
    """The extra argument passes through a wrapper that compares the state before and after
    the update; a non-finite step leaves params and the Hessian EMA as they were."""
    skip = getattr(optim, "skip_nonfinite", None)
    if skip is None:
        pytest.skip("tscale.optim.skip_nonfinite not in this build")
    tx = skip(sophia_g(1e-2, update_every=2))
    state = _state(tx)
    structure = T.leaf_keys(state.opt_state)
    step = _step(tx)
    state, _ = step(state, _batch(seed=0))
    assert T.leaf_keys(state.opt_state) == structure
    before = state.clone()
    state.params["lm_head"]["weight"][0, 0] = float("nan")  # NaN loss and gradients
    state, _ = step(state, _batch(seed=1))
    assert_trees_equal(state.opt_state["inner"], before.opt_state["inner"])


def test_sophia_step_with_the_fused_loss_equals_the_plain_loss() -> None:
    """The estimate samples from apply_fn's logits whatever the training loss is, so Sophia
    takes the fused linear cross-entropy as any optimizer does (float64: same states)."""
    from tscale.losses import make_fused_lm_loss

    tx = sophia_g(1e-2, update_every=2)
    batches = [_batch(seed=i, masked=0.3) for i in range(3)]

    def run(loss_fn) -> TrainState:
        state = _state(tx, torch.float64)
        estimate = make_hessian_estimate(MODEL.apply)
        step = make_train_step(loss_fn, tx, update_extra=estimate)
        for b in batches:
            state, _ = step(state, b)
        return state

    fused = run(make_fused_lm_loss(MODEL, backend="torch"))
    assert_trees_close(fused, run(make_lm_loss(MODEL.apply)), rtol=0, atol=1e-10)
