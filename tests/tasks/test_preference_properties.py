"""Property tests (hypothesis) of the preference losses as the tasks use them (issue 14).

- DPO sigmoid with the policy equal to the reference is ln 2 per pair;
- swapping chosen and rejected mirrors the loss (the σ(−z) side) and negates the margins;
- robust with ε = 0 is sigmoid;
- IPO's minimum is at a length-averaged log-ratio gap of 1/(2β). tscale's rewards are TRL
  1.16's: ``β·(log π(y) − log π_ref(y))`` over the *summed* log-probs, so at the optimum
  ``rewards/margins = β(ρ_w − ρ_l)``, which is 1/2 when both completions have one token and
  n/2 when both have n (the length-averaged margin ``β·gap`` is 1/2 always);
- for the pair-separable losses (every DPO type but aot*, SimPO, CPO, ORPO) a batch of real
  group documents split into microbatches (``make_train_step(microbatches=k)``) gives the same
  step: the same gradient (an SGD step of rate 1) and the same metrics;
- KTO's z₀ comes from the rollout stage over the whole batch, so the step's ``kl`` is the
  whole-batch value and the gradient does not depend on the microbatches (under 2 gloo ranks:
  tests/distributed/test_preference_distributed.py);
- a KTO pair in one group document is the loss and gradient of its two halves as unpaired rows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.data.groups import group_document, single_document_row
from tscale.data.loader import batch_iter, with_logits_index
from tscale.data.pack import pack_examples
from tscale.errors import ConfigError
from tscale.losses.preference import DPO_LOSS_TYPES
from tscale.losses.sequence import PairView, sequence_logps
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.transforms import scale
from tscale.step.compose import make_train_step
from tscale.tasks import TaskContext
from tscale.tasks.kto import KL_BRANCH, KL_FIELD, KTOTask
from tscale.tasks.preference import CPOTask, DPOTask, ORPOTask, PreferenceTask, SimPOTask
from tscale.tasks.reference import REFERENCE

LN2 = math.log(2)
betas = st.floats(0.01, 5.0)
logps = st.floats(-60.0, -0.01)


@st.composite
def pair_batches(draw: Any, size: int | None = None) -> PairView:
    """Per-pair summed log-probs and token counts (float64), every slot a pair."""
    n = size or draw(st.integers(1, 6))
    vals = draw(st.lists(logps, min_size=2 * n, max_size=2 * n))
    toks = draw(st.lists(st.integers(1, 20), min_size=2 * n, max_size=2 * n))
    t = torch.tensor(vals, dtype=torch.float64)
    k = torch.tensor(toks)
    return PairView(t[:n], t[n:], k[:n], k[n:], torch.ones(n, dtype=torch.bool))


def _swap(p: PairView) -> PairView:
    return p._replace(
        chosen=p.rejected,
        rejected=p.chosen,
        chosen_tokens=p.rejected_tokens,
        rejected_tokens=p.chosen_tokens,
    )


def _margins(out: Any) -> torch.Tensor:
    return out.chosen_rewards - out.rejected_rewards


# ------------------------------------------------------------------------------ loss properties


@settings(max_examples=60, deadline=None)
@given(policy=pair_batches(), beta=betas)
def test_policy_equal_to_reference_is_ln2(policy: PairView, beta: float) -> None:
    out = DPOTask(beta=beta).pair_loss(policy, policy)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, LN2), rtol=0, atol=1e-12)
    assert torch.equal(_margins(out), torch.zeros_like(out.losses))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), beta=betas, eps=st.floats(0.0, 0.45))
def test_swapping_chosen_and_rejected_mirrors_the_loss(data: Any, beta: float, eps: float) -> None:
    policy = data.draw(pair_batches())
    ref = data.draw(pair_batches(size=policy.chosen.numel()))
    z = beta * ((policy.chosen - ref.chosen) - (policy.rejected - ref.rejected))
    swapped_sigmoid = DPOTask(beta=beta).pair_loss(_swap(policy), _swap(ref))
    sigmoid = DPOTask(beta=beta).pair_loss(policy, ref)
    torch.testing.assert_close(swapped_sigmoid.losses, -F.logsigmoid(-z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigmoid.losses - swapped_sigmoid.losses, -z, rtol=0, atol=1e-9)
    # robust: ε on the other side, (−(1−ε) log σ(−z) + ε log σ(z)) / (1 − 2ε)
    robust = DPOTask(beta=beta, loss_type=["robust"], label_smoothing=eps)
    want = (-(1 - eps) * F.logsigmoid(-z) + eps * F.logsigmoid(z)) / (1 - 2 * eps)
    torch.testing.assert_close(
        robust.pair_loss(_swap(policy), _swap(ref)).losses, want, rtol=1e-10, atol=1e-10
    )
    hinge = DPOTask(beta=beta, loss_type=["hinge"]).pair_loss(_swap(policy), _swap(ref))
    torch.testing.assert_close(hinge.losses, torch.relu(1 + z), rtol=1e-12, atol=1e-12)
    for task in _pair_separable_tasks(beta):
        r = ref if task.uses_reference else None
        out, back = task.pair_loss(policy, r), task.pair_loss(_swap(policy), _swap(r) if r else r)
        torch.testing.assert_close(_margins(back), -_margins(out), rtol=0, atol=1e-12)
        torch.testing.assert_close(back.chosen_rewards, out.rejected_rewards, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), beta=betas)
def test_robust_without_noise_is_sigmoid(data: Any, beta: float) -> None:
    policy = data.draw(pair_batches())
    ref = data.draw(pair_batches(size=policy.chosen.numel()))
    robust = DPOTask(beta=beta, loss_type=["robust"], label_smoothing=0.0).pair_loss(policy, ref)
    sigmoid = DPOTask(beta=beta).pair_loss(policy, ref)
    torch.testing.assert_close(robust.losses, sigmoid.losses, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    beta=st.floats(0.05, 2.0),
    tokens=st.tuples(st.integers(1, 16), st.integers(1, 16)),
    rho_rejected=st.floats(-20.0, 5.0),
    ref=st.tuples(logps, logps),
    step=st.floats(0.01, 1.0),
)
def test_ipo_minimum_is_at_a_gap_of_one_over_two_beta(
    beta: float, tokens: tuple[int, int], rho_rejected: float, ref: tuple, step: float
) -> None:
    n_w, n_l = tokens
    # ρ_w/|y_w| − ρ_l/|y_l| = 1/(2β): the length-averaged log-ratio gap at the optimum
    rho_w = n_w * (rho_rejected / n_l + 1 / (2 * beta))
    reference = PairView(*(torch.tensor([v], dtype=torch.float64) for v in ref), *_counts(tokens))
    policy = reference._replace(
        chosen=(reference.chosen + rho_w).requires_grad_(),
        rejected=(reference.rejected + rho_rejected).requires_grad_(),
    )
    task = DPOTask(beta=beta, loss_type=["ipo"])
    out = task.pair_loss(policy, reference)
    assert float(out.losses.detach()) <= 1e-18
    grads = torch.autograd.grad(out.losses.sum(), [policy.chosen, policy.rejected])
    assert all(float(g.abs()) <= 1e-9 for g in grads)  # a stationary point, and loss ≥ 0
    for moved in (
        policy._replace(chosen=policy.chosen + step),
        policy._replace(chosen=policy.chosen - step),
        policy._replace(rejected=policy.rejected + step),
    ):  # moving off the optimum either way costs: it is the minimum
        assert float(task.pair_loss(moved, reference).losses) > 0.0
    # tscale's (and TRL 1.16's) margin: β·(ρ_w − ρ_l), summed log-ratios
    margin = float(_margins(out))
    assert margin == pytest.approx(beta * (rho_w - rho_rejected), rel=1e-9, abs=1e-9)
    if n_w == n_l:  # n/2 with n tokens each: 1/2 for one-token completions
        assert margin == pytest.approx(n_w / 2, rel=1e-9, abs=1e-9)
    averaged = beta * (rho_w / n_w - rho_rejected / n_l)
    assert averaged == pytest.approx(0.5, rel=1e-9)  # the length-averaged margin: always 1/2


def _counts(tokens: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor([tokens[0]]), torch.tensor([tokens[1]]), torch.tensor([True])


# ----------------------------------------------------------- microbatches on real group batches


VOCAB = 64
CONFIG = TransformerConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=128,
    init_std=0.2,
    dtype=torch.float64,
)
ROWS = 8  # a batch of 8 rows, split into 2 or 4 microbatches


def _pair_separable_tasks(beta: float) -> list[PreferenceTask]:
    dpo = [
        DPOTask(
            beta=beta,
            loss_type=[t],
            label_smoothing={"robust": 0.1, "exo_pair": 1e-3}.get(t, 0.0),
        )
        for t in DPO_LOSS_TYPES
        if not t.startswith("aot")
    ]
    mpo = DPOTask(beta=beta, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1])
    return [*dpo, mpo, SimPOTask(), CPOTask(), CPOTask(loss_type="simpo"), ORPOTask()]


def _name(task: PreferenceTask) -> str:
    kind = getattr(task, "loss_type", [])
    return "-".join([task.type, *([kind] if isinstance(kind, str) else kind)])


TASKS = {_name(t): t for t in _pair_separable_tasks(0.5)}


def _model() -> tuple[Transformer, TensorDict, TensorDict]:
    """A tiny float64 decoder, its params and a reference that differs from them."""
    model = Transformer(CONFIG)
    params = model.init(R.key(0))
    g = torch.Generator().manual_seed(7)
    ref = T.unflatten(
        {
            k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in T.flatten(params).items()
        }
    )
    return model, params, ref


tokens = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=6)


@st.composite
def group_rows(draw: Any, kto: bool = False) -> list[dict]:
    """ROWS rows of real group documents: one pair per row, or pairs packed into rows (the
    packer's best fit; then padded with single pairs up to ROWS rows). KTO: one completion
    (desirable or undesirable) and the next document's as the KL completion (branch 3)."""
    share = draw(st.booleans())
    n_docs = draw(st.integers(ROWS, 2 * ROWS))
    docs = []
    prompts = [draw(tokens) for _ in range(n_docs)]
    comps = [draw(tokens) for _ in range(2 * n_docs)]
    for i in range(n_docs):
        if kto:
            branch = draw(st.sampled_from([1, 2]))
            kl = comps[2 * ((i + 1) % n_docs)]
            doc = group_document(
                prompts[i], [comps[2 * i], kl], [branch, KL_BRANCH], share_prompt=share
            )
        else:
            doc = group_document(prompts[i], comps[2 * i : 2 * i + 2], [1, 2], share_prompt=share)
        docs.append(doc)
    if draw(st.booleans()):
        rows, _ = pack_examples(docs, 48)
        rows = (rows + [single_document_row(d) for d in docs])[:ROWS]
    else:
        rows = [single_document_row(d) for d in docs[:ROWS]]
    return rows


def _batch(rows: list[dict], use_index: bool) -> TensorDict:
    (batch,) = batch_iter(rows, len(rows), pad_id=0)
    return with_logits_index(batch) if use_index else batch


def _ctx(model: Transformer, params: TensorDict, frozen: dict) -> TaskContext:
    return TaskContext(
        model=model,
        apply_fn=model.apply,
        data=None,
        device=torch.device("cpu"),
        config=None,
        params=params,
        frozen=frozen,
    )


def _steps(task: Any, batch: TensorDict, splits: tuple[int, ...]) -> list[tuple[TensorDict, dict]]:
    """One SGD step of rate 1 (params − gradient) per split count, from the same state."""
    model, params, ref = _model()
    frozen = {REFERENCE: ref} if task.uses_reference else {}
    loss_fn = task.loss(_ctx(model, params, frozen))
    tx = scale(-1.0)
    state = TrainState.create(params, tx.init(params), R.key(1), frozen)
    out = []
    for k in splits:
        step = make_train_step(loss_fn, tx, microbatches=k, donate=False)
        new, metrics = step(state, batch)
        out.append((new.params, {n: float(v) for n, v in metrics.items()}))
    return out


def _assert_same_step(a: tuple[TensorDict, dict], b: tuple[TensorDict, dict]) -> None:
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert b[1][name] == pytest.approx(a[1][name], rel=1e-10, abs=1e-12), name
    for name, value in T.flatten(a[0]).items():
        torch.testing.assert_close(T.flatten(b[0])[name], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TASKS))
@settings(max_examples=4, deadline=None)
@given(rows=group_rows(), use_index=st.booleans(), k=st.sampled_from([2, 4]))
def test_microbatches_give_the_same_step(name: str, rows: list, use_index: bool, k: int) -> None:
    whole, split = _steps(TASKS[name], _batch(rows, use_index), (1, k))
    assert whole[1]["tokens"] >= ROWS  # the normaliser is the number of pairs
    assert whole[1]["grad_norm"] > 0
    _assert_same_step(whole, split)


def test_a_batch_coupled_loss_would_be_caught() -> None:
    """The check above can fail: aot sorts the batch, so a split changes its step (tscale
    refuses aot for that reason; the loss function itself still computes it)."""

    class Coupled(DPOTask):
        def pair_loss(self, policy: PairView, reference: PairView | None) -> Any:
            from tscale.losses.preference import dpo_loss

            assert reference is not None
            return dpo_loss(
                policy.chosen,
                policy.rejected,
                reference.chosen,
                reference.rejected,
                beta=self.beta,
                loss_type="aot_unpaired",
            )

    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    rows = [
        single_document_row(group_document(ids(3), [ids(4), ids(2)], [1, 2], share_prompt=True))
        for _ in range(ROWS)
    ]
    whole, split = _steps(Coupled(beta=0.5), _batch(rows, False), (1, 4))
    with pytest.raises(AssertionError):
        _assert_same_step(whole, split)


# ------------------------------------------------------------------------------ KTO's z₀


def _kto_rollout(task: KTOTask, batch: TensorDict) -> tuple[Any, TrainState, Any]:
    model, params, ref = _model()
    frozen = {REFERENCE: ref}
    ctx = _ctx(model, params, frozen)
    tx = scale(-1.0)
    state = TrainState.create(params, tx.init(params), R.key(1), frozen)
    rollout = task.rollout(ctx)
    assert rollout is not None
    return task.loss(ctx), state, rollout(state, batch, R.key(2))


def _z0_by_hand(batch: TensorDict) -> float:
    """max(0, mean over the KL completions of log π(y') − log π_ref(y')), each document's
    KL completion scored on its own row by the plain model."""
    model, params, ref = _model()
    pol = sequence_logps(model.apply(params, batch), batch)
    refs = sequence_logps(model.apply(ref, batch), batch)
    present = pol.counts[..., KL_BRANCH - 1] > 0
    diffs = (pol.sums - refs.sums)[..., KL_BRANCH - 1][present]
    return max(0.0, float(diffs.mean()))


@settings(max_examples=8, deadline=None)
@given(rows=group_rows(kto=True), use_index=st.booleans(), k=st.sampled_from([2, 4]))
def test_kto_z0_is_the_whole_batch_value_whatever_the_split(
    rows: list, use_index: bool, k: int
) -> None:
    task = KTOTask(beta=0.5)
    batch = _batch(rows, use_index)
    loss_fn, state, seen = _kto_rollout(task, batch)
    z0 = seen[KL_FIELD]
    assert z0.shape == (ROWS,) and bool((z0 == z0[0]).all())
    assert float(z0[0]) == pytest.approx(_z0_by_hand(batch), rel=1e-6, abs=1e-7)  # float32 field
    tx = scale(-1.0)
    steps = [
        make_train_step(loss_fn, tx, microbatches=m, donate=False)(state, seen) for m in (1, k)
    ]
    for _, metrics in steps:
        assert float(metrics["kl"]) == pytest.approx(float(z0[0]), rel=1e-12)
    whole = (steps[0][0].params, {n: float(v) for n, v in steps[0][1].items()})
    split = (steps[1][0].params, {n: float(v) for n, v in steps[1][1].items()})
    _assert_same_step(whole, split)


@settings(max_examples=6, deadline=None)
@given(rows=group_rows(kto=True), weight=st.sampled_from([0.5, 1.0]))
def test_kto_sft_weight_adds_the_desirable_completions_mean_nll(rows: list, weight: float) -> None:
    batch = _batch(rows, False)
    plain_fn, state, seen = _kto_rollout(KTOTask(beta=0.5), batch)
    sft_fn, _, _ = _kto_rollout(KTOTask(beta=0.5, sft_weight=weight), batch)
    frozen = dict(state.frozen)
    plain, _ = plain_fn(state.params, seen, frozen=frozen)
    with_sft, _ = sft_fn(state.params, seen, frozen=frozen)
    model, params, _ = _model()  # by hand: −Σ log π(y) / |y| over the desirable completions
    pol = sequence_logps(model.apply(params, batch), batch)
    sums, counts = pol.sums[..., KL_BRANCH - 3], pol.counts[..., KL_BRANCH - 3]
    present = counts > 0
    nll = float((-sums[present] / counts[present]).sum())
    assert float(with_sft - plain) == pytest.approx(weight * nll, rel=1e-5, abs=1e-6)


@settings(max_examples=8, deadline=None)
@given(
    data=st.data(),
    share=st.booleans(),
    z0=st.floats(0.0, 3.0),
    task=st.sampled_from(
        [KTOTask(beta=0.5), KTOTask(beta=0.1, sft_weight=1.0, undesirable_weight=2.0)]
    ),
)
def test_kto_pair_in_one_document_equals_its_two_halves_as_rows(
    data: Any, share: bool, z0: float, task: KTOTask
) -> None:
    """KTO's paired rows (the chosen reply desirable, the rejected one undesirable, one group
    document) are the loss and gradient of the same completions as two unpaired rows: pairing
    only puts both halves in one batch, with the prompt once."""
    n = data.draw(st.integers(1, 4))
    prompts = [data.draw(tokens) for _ in range(n)]
    chosen, rejected, kl = ([data.draw(tokens) for _ in range(n)] for _ in range(3))
    paired = [
        single_document_row(group_document(p, [c, r, k], [1, 2, KL_BRANCH], share_prompt=share))
        for p, c, r, k in zip(prompts, chosen, rejected, kl, strict=True)
    ]
    halves = [
        single_document_row(group_document(p, [y, k], [b, KL_BRANCH], share_prompt=share))
        for p, c, r, k in zip(prompts, chosen, rejected, kl, strict=True)
        for y, b in ((c, 1), (r, 2))
    ]
    model, params, ref = _model()
    loss_fn = task.loss(_ctx(model, params, {REFERENCE: ref}))
    results = []
    for rows in (paired, halves):
        batch = _batch(rows, False)
        batch[KL_FIELD] = torch.full((len(rows),), z0)  # the rollout stage's field, fixed here
        grad, (loss, aux) = torch.func.grad_and_value(loss_fn, has_aux=True)(
            params, batch, frozen={REFERENCE: ref}
        )
        results.append((float(loss), int(aux["tokens"]), T.leaves(grad)))
    (loss_p, n_p, grad_p), (loss_h, n_h, grad_h) = results
    assert n_p == n_h == 2 * n
    assert loss_p == pytest.approx(loss_h, rel=1e-5, abs=1e-6)
    for a, b in zip(grad_p, grad_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_label_smoothing_is_refused_where_no_loss_type_reads_it() -> None:
    # TRL 1.16 reads it in robust and exo_pair only (sigmoid has no cDPO smoothing): a value
    # that no chosen loss type reads would be silently ignored
    with pytest.raises(ConfigError, match=r"^task.label_smoothing: 0.1 is read by robust"):
        DPOTask(label_smoothing=0.1).check(None)
    with pytest.raises(ConfigError, match=r"^task.label_smoothing: exo_pair needs"):
        DPOTask(loss_type=["exo_pair"]).check(None)
    DPOTask(loss_type=["sigmoid", "robust"], label_smoothing=0.1).check(None)
    smoothed = DPOTask(loss_type=["sigmoid"], label_smoothing=0.1)
    p = PairView(*(torch.tensor([v]) for v in (-1.0, -3.0)), *_counts((1, 1)))
    zero = p._replace(chosen=torch.zeros(1), rejected=torch.zeros(1))
    assert torch.equal(smoothed.pair_loss(p, zero).losses, DPOTask().pair_loss(p, zero).losses)
