"""Shared-prefix branches (``branch_ids``) in flash attention: Triton (interpreted) and the SDPA
path against the explicit softmax, and the mask against its definition.

Rule: query ``i`` sees key ``j`` iff causal, same document, and ``branch[j] == 0 or branch[j] ==
branch[i]``. The layouts span several of the interpreter's blocks (16 and 32 positions), so the
block ranges the kernels walk (the document's prefix, then the rows' own branches) are exercised
across block boundaries, with padding (document 0) and GQA. Tolerances as
``tests/kernels/test_attention.py``.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.errors import ShapeError
from tscale.kernels import attention, attention_reference, branch_bounds

TOL = {"rtol": 2e-5, "atol": 2e-5}


def _qkv(b=2, hq=4, hkv=2, s=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).requires_grad_() for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(b, hq, s, d, generator=g)


def _fwd_bwd(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _check(q, k, v, do, backend="triton", tol=TOL, **kw):
    ref = _fwd_bwd(attention_reference, q, k, v, do, **kw)
    out = _fwd_bwd(attention, q, k, v, do, backend=backend, **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv"), out, ref, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _row(groups: list[tuple[int, list[int]]], s: int, shared: bool = True):
    """doc and branch ids of one row: per group a prompt (branch 0, when ``shared``) and its
    completions (branches 1, 2, ...); documents 1, 2, ...; padding (0, 0) up to ``s``."""
    doc: list[int] = []
    branch: list[int] = []
    for d, (prompt, completions) in enumerate(groups, start=1):
        for k, n in enumerate(completions, start=1):
            if shared and k == 1:
                doc += [d] * prompt
                branch += [0] * prompt
            doc += [d] * (n + (0 if shared else prompt))
            branch += [k] * (n + (0 if shared else prompt))
    assert len(doc) <= s, len(doc)
    return doc + [0] * (s - len(doc)), branch + [0] * (s - len(branch))


def _rows(*rows):
    doc, branch = zip(*rows, strict=True)
    return torch.tensor(doc), torch.tensor(branch)


def _random_layout(seed: int, b: int = 2, s: int = 64):
    """Unsorted, interleaved ids: the rule holds for any ids, not only packed groups."""
    rnd = random.Random(seed)
    doc = [sorted(rnd.randrange(3) for _ in range(s)) for _ in range(b)]
    branch = [[rnd.choice([0, 0, 1, 2, 3]) for _ in range(s)] for _ in range(b)]
    return torch.tensor(doc), torch.tensor(branch)


S = 64
LAYOUTS = {
    # DPO pairs packed two per row, and one long group; padding at the end.
    "pairs-packed": _rows(
        _row([(7, [5, 6]), (4, [9, 3]), (11, [8, 10])], S), _row([(17, [20, 19])], S)
    ),
    # GRPO-like: one prompt, many branches crossing block boundaries.
    "many-branches": _rows(_row([(9, [3, 9, 4, 12, 7, 14])], S), _row([(3, [30, 28])], S)),
    # share_prompt=False: every token in a branch, no prefix.
    "no-prefix": _rows(_row([(5, [8, 6]), (3, [4])], S, shared=False), _row([(9, [23, 20])], S)),
    # A branch before the prompt and a branch split in two (the key ranges in either order).
    "unordered": (
        torch.tensor([[1] * 40 + [2] * 24, [1] * 64]),
        torch.tensor(
            [
                [2] * 12 + [0] * 9 + [1] * 11 + [2] * 8 + [0] * 5 + [3] * 10 + [1] * 9,
                [1] * 20 + [0] * 20 + [1] * 10 + [2] * 14,
            ]
        ),
    ),
    "random-ids": _random_layout(0),
}
CASES = {
    "causal": {},
    "mha": {"hkv": 4},
    "mqa-window-softcap": {"hkv": 1, "window": 9, "softcap": 3.0},
    "full": {"causal": False},
    "ragged": {"s": 40},
}


# Every layout causal; the other cases on the layouts where they bite (kept few: interpreter).
COMBOS = [(layout, "causal") for layout in LAYOUTS] + [
    ("pairs-packed", "mha"),
    ("pairs-packed", "mqa-window-softcap"),
    ("pairs-packed", "full"),
    ("pairs-packed", "ragged"),
    ("many-branches", "mqa-window-softcap"),
    ("no-prefix", "ragged"),
    ("unordered", "full"),
    ("unordered", "ragged"),
    ("random-ids", "full"),
]


@pytest.mark.parametrize(("layout", "case"), COMBOS, ids=[f"{a}-{b}" for a, b in COMBOS])
def test_triton_matches_reference(layout: str, case: str):
    pytest.importorskip("triton")
    kw = dict(CASES[case])
    shape = {k: kw.pop(k) for k in ("s", "hkv") if k in kw}
    q, k, v, do = _qkv(**shape)
    s = q.shape[2]
    doc, branch = (t[:, :s] for t in LAYOUTS[layout])
    _check(q, k, v, do, doc_ids=doc, branch_ids=branch, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_backend_matches_reference(layout: str):
    q, k, v, do = _qkv()
    doc, branch = LAYOUTS[layout]
    _check(q, k, v, do, backend="torch", tol={"rtol": 1e-5, "atol": 1e-5}, doc_ids=doc,
           branch_ids=branch)  # fmt: skip


def test_shared_rows_and_no_documents():
    """doc or branch ids shared by the batch ([1, S]) broadcast; branch ids alone: one document."""
    pytest.importorskip("triton")
    q, k, v, do = _qkv(s=48)
    doc, branch = (t[:, :48] for t in LAYOUTS["pairs-packed"])
    _check(q, k, v, do, doc_ids=doc[:1], branch_ids=branch)
    _check(q, k, v, do, doc_ids=doc, branch_ids=branch[1:])
    _check(q, k, v, do, branch_ids=branch)


def test_cu_seqlens_with_branches():
    pytest.importorskip("triton")
    q, k, v, do = _qkv(b=1, s=48)
    cu = torch.tensor([0, 20, 45])
    branch = torch.tensor([[0] * 6 + [1] * 7 + [2] * 7 + [0] * 4 + [1] * 21 + [0] * 3])
    _check(q, k, v, do, cu_seqlens=cu, branch_ids=branch)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_branch_equals_its_unpacked_sequence(backend: str):
    """The contract's layout (shared prompt; the last prompt token copied into every branch):
    each branch's outputs and gradients equal those of ``prompt + completion`` alone."""
    if backend == "triton":
        pytest.importorskip("triton")
    prompt, completions, hq, hkv, d = 13, [9, 15, 6], 4, 2, 16
    g = torch.Generator().manual_seed(3)
    seqs = [
        [torch.randn(1, h, prompt + n, d, generator=g) for h in (hq, hkv, hkv, hq)]
        for n in completions
    ]
    # One prompt: every sequence shares the first ``prompt`` positions of the first one. The
    # shared prompt queries (all but the last prompt token) have their output gradient in the
    # first sequence only, as in the packed row where they appear once.
    for parts in seqs[1:]:
        for t, t0 in zip(parts[:3], seqs[0][:3], strict=True):
            t[:, :, :prompt] = t0[:, :, :prompt]
        parts[3][:, :, : prompt - 1] = 0.0
    packed_parts, index, branch = [[] for _ in range(4)], [], [0] * (prompt - 1)
    for t, part in zip(seqs[0], packed_parts, strict=True):
        part.append(t[:, :, : prompt - 1])
    start = prompt - 1
    for b, (parts, n) in enumerate(zip(seqs, completions, strict=True), start=1):
        for t, part in zip(parts, packed_parts, strict=True):
            part.append(t[:, :, prompt - 1 :])
        index.append(range(start, start + n + 1))
        branch += [b] * (n + 1)
        start += n + 1
    q, k, v, do = (torch.cat(p, dim=2) for p in packed_parts)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    branch_ids = torch.tensor([branch])
    packed = _fwd_bwd(attention, q, k, v, do, branch_ids=branch_ids, backend=backend)
    dk_sum, dv_sum = torch.zeros(2, 1, hkv, prompt - 1, d)
    for parts, idx in zip(seqs, index, strict=True):
        alone_q, alone_k, alone_v = (t.clone().requires_grad_() for t in parts[:3])
        o, dq, dk, dv = _fwd_bwd(attention_reference, alone_q, alone_k, alone_v, parts[3])
        if parts is seqs[0]:
            dq_first = dq
        sl = slice(idx.start, idx.stop)
        torch.testing.assert_close(packed[0][:, :, sl], o[:, :, prompt - 1 :], **TOL)
        torch.testing.assert_close(packed[1][:, :, sl], dq[:, :, prompt - 1 :], **TOL)
        torch.testing.assert_close(packed[2][:, :, sl], dk[:, :, prompt - 1 :], **TOL)
        torch.testing.assert_close(packed[3][:, :, sl], dv[:, :, prompt - 1 :], **TOL)
        dk_sum += dk[:, :, : prompt - 1]
        dv_sum += dv[:, :, : prompt - 1]
    # The shared prompt's key and value gradients are the sums over the branches that read it.
    torch.testing.assert_close(packed[2][:, :, : prompt - 1], dk_sum, **TOL)
    torch.testing.assert_close(packed[3][:, :, : prompt - 1], dv_sum, **TOL)
    torch.testing.assert_close(packed[1][:, :, : prompt - 1], dq_first[:, :, : prompt - 1], **TOL)


def test_reference_mask_is_the_rule():
    """attention_reference with one-hot values returns the attention weights: compare their
    support with the rule written out pair by pair."""
    doc, branch = _random_layout(5, b=1, s=24)
    q, k = torch.randn(2, 1, 1, 24, 24)
    weights = attention_reference(q, k, torch.eye(24)[None, None], doc_ids=doc, branch_ids=branch)
    weights = weights[0, 0]
    d, b = doc[0].tolist(), branch[0].tolist()
    for i in range(24):
        for j in range(24):
            visible = j <= i and d[i] == d[j] and (b[j] == 0 or b[j] == b[i])
            assert (weights[i, j] > 0) == visible, (i, j)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=40),
    st.booleans(),
)
def test_branch_bounds(ids: list[tuple[int, int]], sort: bool):
    ids = sorted(ids, key=lambda t: t[0]) if sort else ids
    doc = torch.tensor([[d for d, _ in ids]], dtype=torch.int32)
    branch = torch.tensor([[b for _, b in ids]], dtype=torch.int32)
    got = [t[0].tolist() for t in branch_bounds(doc, branch)]
    n = len(ids)

    def span(pred):
        idx = [j for j in range(n) if pred(j)]
        return (idx[0], idx[-1]) if idx else (n, -1)

    for i, (d, b) in enumerate(ids):
        prefix = span(lambda j, d=d: ids[j] == (d, 0))
        own = span(lambda j, d=d, b=b: ids[j] == (d, b))
        readers = span(lambda j, d=d, b=b: ids[j][0] == d and (b == 0 or ids[j][1] == b))
        want = (*prefix, *own, *readers)
        assert tuple(t[i] for t in got) == want, (i, ids)


def test_bad_branch_ids():
    q, k, v, _ = _qkv(s=32)
    with pytest.raises(ShapeError, match="branch_ids"):
        attention(q, k, v, branch_ids=torch.zeros(2, 31, dtype=torch.long))
    with pytest.raises(ShapeError, match="branch_ids"):
        attention(q, k, v, branch_ids=torch.zeros(2, 32))
    with pytest.raises(ShapeError, match="branch_ids"):
        attention_reference(q, k, v, branch_ids=torch.zeros(3, 32, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned rows' max
def test_sibling_branches_are_skipped():
    """Blocks of a sibling completion are never visited: NaN planted there (K, V of its keys, Q
    and dO of its queries; a visited block would spread it, 0 * NaN = NaN) leaves the other
    branch's outputs and gradients finite and exact. Blocks (interpreter): 32 queries x 16 keys
    (forward, dQ) and 32 keys x 16 queries (dK/dV). Layout: prompt 0-31, branch 1 32-79, branch
    2 80-127; the document bounds alone would visit every block of branch 1."""
    pytest.importorskip("triton")
    s = 128
    branch = torch.tensor([[0] * 32 + [1] * 48 + [2] * 48])
    q, k, v, do = _qkv(b=1, s=s)
    ref = _fwd_bwd(attention_reference, q, k, v, do, branch_ids=branch)
    with torch.no_grad():
        k[:, :, 32:80] = float("nan")
        v[:, :, 32:80] = float("nan")
        q[:, :, 32:64] = float("nan")  # the query block 32-63 holds branch 1 only
    do = do.clone()
    do[:, :, 32:64] = float("nan")
    out = _fwd_bwd(attention, q, k, v, do, branch_ids=branch, backend="triton")
    rows, keys = slice(96, 128), slice(96, 128)  # whole query / key blocks of branch 2
    for name, a, b, sl in zip(
        ("o", "dq", "dk", "dv"), out, ref, (rows, rows, keys, keys), strict=True
    ):
        torch.testing.assert_close(
            a[:, :, sl], b[:, :, sl], **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
