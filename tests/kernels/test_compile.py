"""The Triton kernels compile for real GPUs, checked on a machine without one.

The interpreter tests check what the kernels compute; Triton's compiler is stricter (types of
loop-carried values, what may be called inside a kernel, whether tiles fit the target). Each test
runs a launcher with CPU tensors, records its launches (``tscale.kernels._aot.capture``) and
compiles them with ``triton.compile`` for sm_90 (H100) through the ``ptxas``
bundled with Triton. It also checks the kernel's shared memory fits the target, which would
otherwise fail only at launch ("out of resources").
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tscale.kernels import _aot, _dispatch  # noqa: E402
from tscale.kernels.flash_attention import branch_bounds, document_bounds  # noqa: E402

pytestmark = [
    pytest.mark.skipif(_aot.bundled_tool("ptxas") is None, reason="no ptxas in this triton wheel"),
    # Triton 3.9 warns that its FP-fusion default changes in 3.10; irrelevant to compiling.
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"),
]
SHARED_LIMIT = {90: 227 * 1024}  # bytes of shared memory one block may use on sm_90


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from triton.runtime.jit import JITFunction

    if not isinstance(triton.language.standard.sum, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1; it cannot compile now")


def _compile_all(calls: list, capability: int) -> None:
    assert calls
    for kernel, args, kwargs in calls:
        compiled = _aot.compile_launch(kernel, args, kwargs, capability=capability)
        assert compiled.asm["cubin"], kernel.__name__
        assert compiled.metadata.shared <= SHARED_LIMIT[capability], kernel.__name__


ATTENTION = {
    "bf16-d128-causal": (torch.bfloat16, 128, 2048, {"causal": True}),
    "bf16-d64-packed-window-softcap": (
        torch.bfloat16,
        64,
        1000,
        {"causal": True, "doc": True, "window": 256, "softcap": 50.0},
    ),
    "fp32-d32-full": (torch.float32, 32, 512, {"causal": False}),
    "bf16-d128-branches": (torch.bfloat16, 128, 1024, {"causal": True, "branch": True}),
    "fp16-d64-branches-window-softcap": (
        torch.float16,
        64,
        777,
        {"causal": True, "branch": True, "window": 128, "softcap": 30.0},
    ),
}


@pytest.mark.parametrize("variant", ATTENTION)
def test_attention_compiles(variant: str):
    dtype, d, s, kw = ATTENTION[variant]
    mod = _dispatch.triton_module("_flash_attention_triton")
    q = torch.empty(2, 8, s, d, dtype=dtype)
    k = torch.empty(2, 2, s, d, dtype=dtype)
    doc = first = last = None
    masks: dict[str, torch.Tensor] = {}
    if kw.get("doc"):
        doc = torch.zeros(1, s, dtype=torch.int32)
        first, last = document_bounds(doc)
    if kw.get("branch"):
        doc = torch.zeros(2, s, dtype=torch.int32)
        branch = torch.zeros(2, s, dtype=torch.int32)
        first, last, first2, last2, key_first, key_last = branch_bounds(doc, branch)
        masks = {"branch": branch, "first2": first2, "last2": last2}
    opts = {
        "causal": kw["causal"],
        "window": kw.get("window"),
        "softcap": kw.get("softcap"),
        "scale": d**-0.5,
    }
    names = ("_attn_fwd", "_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
    with _aot.capture(mod, *names) as calls:
        o, lse = mod.attn_forward(q, k, k, doc, first, last, **masks, **opts)
        if masks:
            masks |= {"key_first": key_first, "key_last": key_last}
        mod.attn_backward(o, q, k, k, o, lse, doc, first, last, **masks, **opts)
    assert [c[0].__name__ for c in calls] == list(names)
    _compile_all(calls, 90)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cross_entropy_compiles(dtype: torch.dtype):
    mod = _dispatch.triton_module("_cross_entropy_triton")
    logits = torch.empty(64, 128256, dtype=dtype)
    labels = torch.zeros(64, dtype=torch.long)
    f32 = torch.empty(64)
    opts = {
        "ignore_index": -100,
        "smoothing": 0.1,
        "z_coef": 1e-4,
        "softcap": 30.0 if dtype == torch.bfloat16 else None,
    }
    with _aot.capture(mod, "_ce_fwd_kernel", "_ce_bwd_kernel") as calls:
        mod.ce_forward(logits, labels, f32, f32, **opts)
        mod.ce_backward_(logits, labels, f32, f32, col_offset=0, vocab_size=128256, **opts)
    _compile_all(calls, 90)


def test_rms_norm_compiles():
    mod = _dispatch.triton_module("_rmsnorm_triton")
    x = torch.empty(64, 4096, dtype=torch.bfloat16)
    w = torch.empty(4096, dtype=torch.bfloat16)
    with _aot.capture(mod, "_rms_fwd", "_rms_bwd") as calls:
        mod.rms_forward(x, w, 1e-6)
        mod.rms_backward(x, x, w, torch.empty(64))
    _compile_all(calls, 90)
