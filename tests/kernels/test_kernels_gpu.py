"""The compiled Triton kernels on a CUDA device, at the shapes training uses.

Skipped without CUDA. Run with ``pytest -m gpu tests/kernels``. Tolerances on bf16 follow the
FlashAttention test suite: the kernel's error against an fp32 reference must be at most twice
the error of PyTorch's own bf16 path (SDPA / eager matmul + cross-entropy) plus a small floor, so
the bound adapts to the shape instead of being a guessed constant. fp32 inputs (IEEE dots) are
compared directly to 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tscale.kernels import (
    attention,
    attention_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]
pytest.importorskip("triton")

DEV = "cuda"


@pytest.fixture(autouse=True)
def _compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the conftest sets it for CPU tests


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _grads(out: torch.Tensor, inputs, grad: torch.Tensor | None = None):
    return torch.autograd.grad(out, inputs, grad if grad is not None else torch.ones_like(out))


# ------------------------------------------------------------------------------------------
# fused linear cross-entropy


@pytest.mark.parametrize(
    "kw",
    [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}, {"softcap": 30.0, "ignore_index": 3}],
    ids=["plain", "smoothing-zloss", "softcap"],
)
def test_linear_cross_entropy_bf16(kw):
    g = torch.Generator(device=DEV).manual_seed(0)
    n, h, v = 4096, 2048, 32003  # vocabulary not a multiple of any block
    hidden = torch.randn(n, h, device=DEV, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=DEV, generator=g) * h**-0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[::7] = kw.get("ignore_index", -100)

    def fp32_ref():
        h32 = hidden.detach().float().requires_grad_()
        w32 = weight.detach().float().requires_grad_()
        loss, _ = linear_cross_entropy_reference(h32, w32, labels, **kw)
        return (loss, *_grads(loss, (h32, w32)))

    ref = fp32_ref()
    eager = linear_cross_entropy_reference(hidden, weight, labels, **kw)[0]
    eager = (eager, *_grads(eager, (hidden, weight)))
    out, tokens = linear_cross_entropy(hidden, weight, labels, **kw)  # auto: Triton on CUDA
    out = (out, *_grads(out, (hidden, weight)))
    assert int(tokens) == int((labels != kw.get("ignore_index", -100)).sum())
    for name, a, b, r in zip(("loss", "dhidden", "dweight"), out, eager, ref, strict=True):
        assert _err(a, r) <= 2 * _err(b, r) + 1e-3 * r.abs().max().item(), name


def test_linear_cross_entropy_fp32_tight():
    g = torch.Generator(device=DEV).manual_seed(1)
    hidden = torch.randn(512, 256, device=DEV, generator=g, requires_grad=True)
    weight = torch.randn(1000, 256, device=DEV, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (512,), device=DEV, generator=g)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 15.0}
    ref = linear_cross_entropy_reference(hidden, weight, labels, **kw)[0]
    out = linear_cross_entropy(hidden, weight, labels, backend="triton", chunk_bytes=2**18, **kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(out, (hidden, weight)), _grads(ref, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_linear_cross_entropy_never_holds_all_logits():
    """Peak memory stays below the size of the bf16 logits alone (N x V x 2 bytes)."""
    n, h, v = 8192, 1024, 65536
    hidden = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (n,), device=DEV)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = linear_cross_entropy(hidden, weight, labels, chunk_bytes=128 * 2**20)
    grads = _grads(loss, (hidden, weight))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(t.numel() * 2 for t in grads)
    assert extra < n * v * 2 / 2, extra


# ------------------------------------------------------------------------------------------
# attention


def _qkv(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def make(h):
        return torch.randn(b, h, s, d, device=DEV, generator=g).to(dtype).requires_grad_()

    return (
        make(hq),
        make(hkv),
        make(hkv),
        torch.randn(b, hq, s, d, device=DEV, generator=g).to(dtype),
    )


def _packed_doc_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        ids, doc = [], 0
        while len(ids) < s:
            ids += [doc] * int(torch.randint(20, 600, (1,), generator=g))
            doc += 1
        rows.append(ids[:s])
    return torch.tensor(rows, device=DEV)


def _packed_branch_ids(b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference groups packed in rows: per document a prompt (branch 0) and 1-6 completions
    (branches 1, 2, ...), random lengths; the row's tail is padding (document 0)."""
    g = torch.Generator().manual_seed(seed)

    def n(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    docs, branches = [], []
    for _ in range(b):
        doc, branch, d = [], [], 1
        while len(doc) < s:
            completions = [n(10, 300) for _ in range(n(1, 7))]
            doc += [d] * (n(10, 400) + sum(completions))
            branch += [0] * (len(doc) - len(branch) - sum(completions))
            for k, c in enumerate(completions, start=1):
                branch += [k] * c
            d += 1
        pad = n(0, 200)
        docs.append(doc[: s - pad] + [0] * pad)
        branches.append(branch[: s - pad] + [0] * pad)
    return torch.tensor(docs, device=DEV), torch.tensor(branches, device=DEV)


def _mask_kw(kw: dict, b: int, s: int) -> dict:
    kw = dict(kw)
    if kw.get("doc_ids") == "packed":
        kw["doc_ids"] = _packed_doc_ids(b, s)
    if kw.get("branch_ids") == "packed":
        kw["doc_ids"], kw["branch_ids"] = _packed_branch_ids(b, s)
    return kw


ATTN = {
    "d128-causal": (2, 16, 4, 2048, 128, {}),
    "d64-full": (2, 8, 8, 1024, 64, {"causal": False}),
    "d128-packed": (2, 16, 4, 2048, 128, {"doc_ids": "packed"}),
    "d128-window-softcap-ragged": (1, 8, 2, 1000, 128, {"window": 256, "softcap": 50.0}),
    "d64-mqa-packed-window": (1, 8, 1, 2048, 64, {"doc_ids": "packed", "window": 128}),
    "d128-branches": (2, 16, 4, 2048, 128, {"branch_ids": "packed"}),
    "d64-branches-softcap-ragged": (2, 8, 2, 1000, 64, {"branch_ids": "packed", "softcap": 30.0}),
}


@pytest.mark.parametrize("case", ATTN)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_16bit(case: str, dtype: torch.dtype):
    b, hq, hkv, s, d, kw = ATTN[case]
    kw = _mask_kw(kw, b, s)
    q, k, v, do = _qkv(b, hq, hkv, s, d, dtype)
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ins32, **kw)
    ref = (ref, *_grads(ref, ins32, do.float()))
    base = attention(q, k, v, backend="torch", **kw)
    base = (base, *_grads(base, (q, k, v), do))
    out = attention(q, k, v, **kw)  # auto: Triton on CUDA
    assert out.dtype == dtype
    out = (out, *_grads(out, (q, k, v), do))
    for name, a, bb, r in zip(("o", "dq", "dk", "dv"), out, base, ref, strict=True):
        assert _err(a, r) <= 2 * _err(bb, r) + 1e-3, (name, _err(a, r), _err(bb, r))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"doc_ids": "packed", "window": 100, "softcap": 20.0},
        {"branch_ids": "packed", "window": 100, "softcap": 20.0},
    ],
    ids=["causal", "everything", "branches"],
)
def test_attention_fp32_tight(kw):
    kw = _mask_kw(kw, 1, 512)
    q, k, v, do = _qkv(1, 4, 2, 512, 64, torch.float32)
    ref = attention_reference(q, k, v, **kw)
    out = attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(out, (q, k, v), do), _grads(ref, (q, k, v), do), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rms_norm(dtype: torch.dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(8192, 4096, device=DEV, generator=g) * 2).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(4096, device=DEV, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(8192, 4096, device=DEV, generator=g).to(dtype)
    ins32 = [x.detach().float().requires_grad_(), w.detach().float().requires_grad_()]
    ref = rms_norm_reference(*ins32, 1e-6)
    ref = (ref, *_grads(ref, ins32, dy.float()))
    out = rms_norm(x, w, 1e-6)
    out = (out, *_grads(out, (x, w), dy))
    if dtype == torch.float32:
        for a, r in zip(out, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    else:
        base = rms_norm_reference(x, w, 1e-6)
        base = (base, *_grads(base, (x, w), dy))
        for name, a, bb, r in zip(("y", "dx", "dw"), out, base, ref, strict=True):
            assert _err(a, r) <= 2 * _err(bb, r) + 1e-3 * r.abs().max().item(), name
