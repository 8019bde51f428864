"""Shared-prompt group rows give each completion the log-prob of its separate computation.

The reference is the plain model on each prompt + completion as its own right-padded row (no
doc_ids, no branch_ids), its token log-probs summed over the completion.
"""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.data.groups import group_document, single_document_row
from tscale.data.loader import batch_iter, with_logits_index
from tscale.data.pack import pack_examples
from tscale.errors import ShapeError
from tscale.losses.sequence import SequenceLogps, pair_view, sequence_logps
from tscale.models.families import FULL, SLIDING
from tscale.models.transformer import Transformer, TransformerConfig

BASE = TransformerConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
    init_std=0.2,
)
CONFIGS = {
    "llama-gqa": BASE,
    # windows shorter than the rows: a branch's window must be measured in positions, not slots
    "mistral-window": attrs.evolve(BASE, family="mistral", sliding_window=4),
    "gemma2-softcaps": attrs.evolve(
        BASE,
        family="gemma2",
        sliding_window=5,
        layer_types=(SLIDING, FULL),
        query_pre_attn_scalar=8.0,
        attn_logit_softcap=2.0,
        final_logit_softcap=3.0,
    ),
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _model(name: str, dtype: torch.dtype) -> tuple[Transformer, TensorDict]:
    model = Transformer(attrs.evolve(CONFIGS[name], dtype=dtype))
    params = model.init(R.key(0))
    g = torch.Generator().manual_seed(1)  # perturb norms too, so every weight shows
    flat = {
        k: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.dim() == 1 else t
        for k, t in T.flatten(params).items()
    }
    return model, T.unflatten(flat)


tokens = st.lists(st.integers(3, 63), min_size=1, max_size=8)


@st.composite
def groups(draw) -> tuple:
    """(prompt, completions, branches) with 2-3 branches among ids 1..3 in any order."""
    branches = draw(st.permutations([1, 2, 3]))[: draw(st.integers(2, 3))]
    return draw(tokens), [draw(tokens) for _ in branches], list(branches)


def _separate_logps(model, params, gs) -> dict[tuple[int, int], float]:
    """{(group, branch): summed completion log-prob} from the plain model, one row each."""
    rows, keys, spans = [], [], []
    for gi, (prompt, comps, branches) in enumerate(gs):
        for comp, b in zip(comps, branches, strict=True):
            rows.append({"input_ids": prompt + comp, "labels": [0] * (len(prompt) + len(comp))})
            keys.append((gi, b))
            spans.append((len(prompt), len(comp)))
    (batch,) = batch_iter(rows, len(rows), pad_id=0)
    logp = torch.log_softmax(model.apply(params, batch).double(), dim=-1)
    out = {}
    for r, (key, (p, c)) in enumerate(zip(keys, spans, strict=True)):
        targets = batch["input_ids"][r, p : p + c]
        out[key] = float(logp[r, p - 1 : p + c - 1].gather(-1, targets[:, None]).sum())
    return out


def _rows(gs, share: bool, packed: bool) -> tuple[list[dict], dict[tuple[int, int], int]]:
    """The rows of the group documents, and where each group went: {(row, doc id): group}."""
    docs = [group_document(*g, share_prompt=share) for g in gs]
    if not packed:
        return [single_document_row(d) for d in docs], {(i, 1): i for i in range(len(docs))}
    rows, _ = pack_examples(docs, 64)
    by_content = {}
    for i, d in enumerate(docs):
        by_content.setdefault(json.dumps(d), []).append(i)
    where = {}
    for r, row in enumerate(rows):
        for d in sorted(set(row["doc_ids"])):
            at = [t for t, v in enumerate(row["doc_ids"]) if v == d]
            doc = {k: [row[k][t] for t in at] for k in docs[0]}
            doc["labels"][-1] = -100  # the packer masks a document's last label (already -100)
            where[(r, d)] = by_content[json.dumps(doc)].pop()
    return rows, where


def _check(name, dtype, gs, share, packed, use_index, tol=None):
    model, params = _model(name, dtype)
    rows, where = _rows(gs, share, packed)
    (batch,) = batch_iter(rows, len(rows), pad_id=0, pad_to_multiple_of=8)
    if use_index:
        batch = with_logits_index(batch)
    logits = model.apply(params, batch)
    seq = sequence_logps(logits, batch)
    assert seq.sums.dtype == dtype
    assert seq.sums.shape == seq.counts.shape == (len(rows), batch["labels"].shape[1], 3)
    want = _separate_logps(model, params, gs)
    got, count = torch.zeros(3 * len(gs), dtype=torch.float64), torch.zeros(3 * len(gs))
    expected, expected_count = torch.zeros_like(got), torch.zeros_like(count)
    for i, ((row, doc), g) in enumerate(sorted(where.items())):
        for comp, b in zip(gs[g][1], gs[g][2], strict=True):
            k = 3 * i + b - 1
            got[k] = float(seq.sums[row, doc - 1, b - 1])
            count[k] = float(seq.counts[row, doc - 1, b - 1])
            expected[k], expected_count[k] = want[(g, b)], len(comp)
    tol = TOLERANCE[dtype] if tol is None else tol
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    assert torch.equal(count, expected_count)
    assert int(seq.counts.sum()) == sum(len(c) for g in gs for c in g[1])  # nothing else counted


@settings(max_examples=12, deadline=None)
@given(
    st.lists(groups(), min_size=1, max_size=5),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_group_rows_equal_separate_sequences(gs, share, packed, use_index, dtype):
    _check("llama-gqa", dtype, gs, share, packed, use_index)


@pytest.mark.parametrize("name", ["mistral-window", "gemma2-softcaps"])
@settings(max_examples=6, deadline=None)
@given(gs=st.lists(groups(), min_size=2, max_size=5), share=st.booleans())
def test_windows_and_softcaps_follow_the_branch(name, gs, share):
    # Gemma 2's soft-capped attention takes its softmax in float32 (as HF's eager code does), so
    # float64 rows of different lengths agree to float32 rounding there, not to 1e-10.
    tol = 1e-6 if name == "gemma2-softcaps" else None
    _check(name, torch.float64, gs, share, packed=True, use_index=False, tol=tol)


def test_every_token_of_a_branch_has_its_unpacked_hidden_state():
    model, params = _model("llama-gqa", torch.float64)
    prompt, comps = [5, 9, 11, 4], [[7, 8, 20], [30], [40, 41]]
    doc = group_document(prompt, comps, [1, 2, 3], share_prompt=True)
    other = group_document([6, 6], [[9], [10]], [1, 2], share_prompt=True)
    (row,), _ = pack_examples([other, doc], 64)  # best fit: the longer document first
    (batch,) = batch_iter([row], 1, pad_id=0)
    h = model.hidden_states(params, batch)[0]
    start = row["doc_ids"].index(2 if len(doc["input_ids"]) < len(other["input_ids"]) else 1)
    for b, comp in enumerate(comps, start=1):
        at = [start + t for t, v in enumerate(doc["branch_ids"]) if v in (0, b)]
        alone = TensorDict({"input_ids": torch.tensor([prompt + comp])}, batch_size=[1])
        torch.testing.assert_close(h[at], model.hidden_states(params, alone)[0], atol=1e-12, rtol=0)


def test_without_branch_ids_each_document_is_one_sequence():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, 4, -100]])
    batch = {"labels": labels, "doc_ids": torch.tensor([[1, 1, 1, 0], [1, 1, 2, 2]])}
    seq = sequence_logps(logits, batch, num_branches=1)
    lp = torch.log_softmax(logits, -1)
    assert seq.sums.shape == (2, 4, 1)
    torch.testing.assert_close(seq.sums[0, 0, 0], lp[0, 0, 1] + lp[0, 1, 2])
    torch.testing.assert_close(seq.sums[1, :2, 0], torch.stack([lp[1, 0, 3], lp[1, 2, 4]]))
    assert seq.counts[:, :, 0].tolist() == [[2, 0, 0, 0], [1, 1, 0, 0]]
    bf16 = sequence_logps(logits.bfloat16(), batch, num_branches=1)
    assert bf16.sums.dtype == torch.float32
    with pytest.raises(ShapeError, match="logits have shape"):
        sequence_logps(logits[:, :3], batch)
    with pytest.raises(RuntimeError, match="exceeds"):
        sequence_logps(logits, batch, max_docs=1)


def test_pair_view_flattens_rows_and_documents():
    sums = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    counts = torch.tensor([[[2, 1, 0], [3, 0, 0]], [[0, 0, 0], [1, 4, 2]]])
    view = pair_view(SequenceLogps(sums, counts))
    assert view.chosen.tolist() == [0.0, 3.0, 6.0, 9.0]
    assert view.rejected.tolist() == [1.0, 4.0, 7.0, 10.0]
    assert view.chosen_tokens.tolist() == [2, 3, 0, 1]
    assert view.rejected_tokens.tolist() == [1, 0, 0, 4]
    assert view.valid.tolist() == [True, False, False, True]
    with pytest.raises(ShapeError, match="NB >= 2"):
        pair_view(SequenceLogps(sums[..., :1], counts[..., :1]))


def test_gradients_flow_through_the_shared_prompt():
    """The prompt is stored once, so its weights get the sum of both branches' gradients."""
    model, params = _model("llama-gqa", torch.float64)
    gs = [([5, 9, 11], [[7, 8], [30, 31, 32]], [1, 2])]
    docs = [single_document_row(group_document(*gs[0], share_prompt=True))]
    (batch,) = batch_iter(docs, 1, pad_id=0)
    sep = [single_document_row(group_document(*gs[0], share_prompt=False))]
    (sep_batch,) = batch_iter(sep, 1, pad_id=0)

    def total(p, b):
        v = pair_view(sequence_logps(model.apply(p, b), b))
        return (v.chosen - 2 * v.rejected).sum()

    g1 = torch.func.grad(total)(params, batch)
    g2 = torch.func.grad(total)(params, sep_batch)
    # RMSNorm runs in float32 even for float64 params (as HF's), so the prompt's gradient, summed
    # over branches before the norm here and after it in the separate layout, agrees to float32.
    for k, v in T.flatten(g1).items():
        torch.testing.assert_close(v, T.flatten(g2)[k], atol=1e-6, rtol=1e-5)
