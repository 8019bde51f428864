"""Flash attention (Triton, interpreted on CPU) and the SDPA path against the explicit softmax.

Tolerances (fp32, interpreter): outputs and the gradients of q, k, v agree with
``attention_reference`` to ``rtol=atol=2e-5`` (observed ~1e-6: online-softmax rescaling and
block-wise accumulation order). fp16 inputs: 1e-2 (fp16 probabilities feed the P·V and dS·K
products, as on the GPU). bf16 is not tested here: the interpreter multiplies bf16 tiles as raw
uint16 (triton 3.9), so bf16 runs only in the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.errors import ShapeError
from tscale.kernels import (
    KernelError,
    attention,
    attention_reference,
    doc_ids_from_cu_seqlens,
    document_bounds,
)

TOL = {"rtol": 2e-5, "atol": 2e-5}
PACKED = [0] * 5 + [1] * 13 + [2] * 2 + [3] * 12  # 32 tokens, documents of 5, 13, 2, 12


def _qkv(b=2, hq=4, hkv=2, s=32, d=16, dtype=torch.float32, seed=0, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)

    def make(h):
        if layout == "bshd":  # the model's layout, transposed to [B, H, S, D] without a copy
            t = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, generator=g).to(dtype)
        return t.requires_grad_()

    q, k, v = make(hq), make(hkv), make(hkv)
    do = torch.randn(b, hq, s, d, generator=g).to(dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _triton(q, k, v, **kw):
    return attention(q, k, v, backend="triton", **kw)


def _check(q, k, v, do, tol=TOL, **kw):
    ref = _fwd_bwd(attention_reference, q, k, v, do, **kw)
    out = _fwd_bwd(_triton, q, k, v, do, **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv"), out, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


CASES = {
    "causal": {},
    "full": {"causal": False},
    "causal-ragged": {"s": 40},  # sequence not a multiple of the blocks
    "full-ragged": {"s": 40, "causal": False},
    "mha": {"hkv": 4},
    "mqa": {"hkv": 1},
    "d32-scale": {"d": 32, "scale": 0.3},
    "doc-ids": {"doc_ids": [PACKED, [7] * 32]},
    "doc-ids-full": {"doc_ids": [PACKED, PACKED[::-1]], "causal": False},
    "doc-ids-interleaved": {"doc_ids": [[i % 3 for i in range(32)], [i // 7 for i in range(32)]]},
    "window": {"window": 7},
    "window-ragged": {"s": 40, "window": 20},
    "softcap": {"softcap": 2.0},
    "everything": {"hkv": 1, "doc_ids": [PACKED, PACKED], "window": 5, "softcap": 3.0},
}


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case: str):
    pytest.importorskip("triton")
    kw = dict(CASES[case])
    shape = {k: kw.pop(k) for k in ("s", "hkv", "d") if k in kw}
    q, k, v, do = _qkv(**shape)
    if "doc_ids" in kw:
        kw["doc_ids"] = torch.tensor(kw["doc_ids"])
    _check(q, k, v, do, **kw)


def test_cu_seqlens_equals_doc_ids():
    pytest.importorskip("triton")
    q, k, v, do = _qkv(b=1, s=40)
    cu = torch.tensor([0, 3, 17, 30, 36])  # the last 4 tokens are padding: one more document
    doc = doc_ids_from_cu_seqlens(cu, 40)
    assert doc.tolist() == [[0] * 3 + [1] * 14 + [2] * 13 + [3] * 6 + [4] * 4]
    _check(q, k, v, do, cu_seqlens=cu)
    a = _fwd_bwd(_triton, q, k, v, do, cu_seqlens=cu)
    b = _fwd_bwd(_triton, q, k, v, do, doc_ids=doc)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_model_layout_without_copy():
    """q, k, v as transposed views of [B, S, H, D]; gradients come back in the same layout."""
    pytest.importorskip("triton")
    q, k, v, do = _qkv(layout="bshd")
    assert not q.is_contiguous()
    _check(q, k, v, do, doc_ids=torch.tensor([PACKED]))
    out = _triton(q, k, v)
    assert out.stride() == q.stride()


def test_fp16():
    pytest.importorskip("triton")
    q, k, v, do = _qkv(b=1, dtype=torch.float16)
    _check(q, k, v, do, tol={"rtol": 1e-2, "atol": 1e-2}, doc_ids=torch.tensor([PACKED]))


def test_packed_rows_equal_separate_documents():
    """Field notes: packing must not change what a document computes (isolation, trl#3067)."""
    pytest.importorskip("triton")
    lengths = [5, 13, 2, 12]
    q, k, v, do = _qkv(b=1)
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None]
    packed = _fwd_bwd(_triton, q, k, v, do, doc_ids=doc)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        parts = [t[:, :, sl].detach().requires_grad_() for t in (q, k, v)]
        alone = _fwd_bwd(attention_reference, *parts, do[:, :, sl])
        for a, b in zip(packed, alone, strict=True):
            torch.testing.assert_close(a[:, :, sl], b, **TOL)
        start += n


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": False},
        {"doc_ids": torch.tensor([PACKED, PACKED[::-1]])},
        {"window": 6, "doc_ids": torch.tensor([PACKED])},
        {"softcap": 5.0},
    ],
    ids=["causal", "full", "doc", "window-doc", "softcap"],
)
def test_torch_backend_matches_reference(kw):
    q, k, v, do = _qkv(s=24 if "doc_ids" not in kw else 32)
    ref = _fwd_bwd(attention_reference, q, k, v, do, **kw)
    out = _fwd_bwd(attention, q, k, v, do, backend="torch", **kw)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_uses_pytorch_on_cpu(monkeypatch: pytest.MonkeyPatch):
    from tscale.kernels import flash_attention as attn_mod

    monkeypatch.setattr(attn_mod._FlashAttention, "apply", None)  # would fail if reached
    q, k, v, _ = _qkv()
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), **TOL)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.booleans())
def test_document_bounds(ids: list[int], sort: bool):
    """first/last same-id index for any ids, sorted (packed) or not."""
    ids = sorted(ids) if sort else ids
    first, last = document_bounds(torch.tensor([ids, ids[::-1]]))
    for row, values in enumerate((ids, ids[::-1])):
        for i, x in enumerate(values):
            same = [j for j, y in enumerate(values) if y == x]
            assert first[row, i] == same[0] and last[row, i] == same[-1]


def test_unsupported_head_dim_falls_back_or_raises():
    q, k, v, _ = _qkv(d=8)
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), **TOL)
    with pytest.raises(KernelError, match="head dim 8"):
        attention(q, k, v, backend="triton")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v, _ = _qkv()
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        attention(q, k, v, backend="triton")


def test_bad_arguments():
    q, k, v, _ = _qkv()
    with pytest.raises(ShapeError, match="divide"):
        attention(q, k[:, :1].expand(2, 3, 32, 16), v[:, :1].expand(2, 3, 32, 16))
    with pytest.raises(ShapeError, match="k/v"):
        attention(q, k[:, :, :16], v[:, :, :16])
    with pytest.raises(ShapeError, match="doc_ids"):
        attention(q, k, v, doc_ids=torch.zeros(2, 31, dtype=torch.long))
    with pytest.raises(KernelError, match="not both"):
        attention(
            q, k, v, doc_ids=torch.zeros(2, 32, dtype=torch.long), cu_seqlens=torch.tensor([0, 32])
        )
    with pytest.raises(KernelError, match="causal"):
        attention(q, k, v, causal=False, window=4)
    with pytest.raises(KernelError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(KernelError, match="softcap"):
        attention(q, k, v, softcap=-1.0)
