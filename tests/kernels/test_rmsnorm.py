"""RMSNorm: the Triton kernel (interpreted) against the reference, the reference against the model.

Tolerances: fp32 outputs and gradients agree to ``rtol=atol=1e-5`` (observed <1e-6; the weight
gradient is a sum over rows in a different order). bf16 outputs: within one bf16 ulp of the
reference (the kernel rounds once, the model's form twice); gradients to 2e-2 relative.
"""

from __future__ import annotations

import pytest
import torch

from tscale.errors import ShapeError
from tscale.kernels import KernelError, rms_norm, rms_norm_reference
from tscale.models.transformer import _rms_norm

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(dtype)
    return x, w, dy


def _fwd_bwd(fn, x, w, dy, **kw):
    y = fn(x, w, 1e-5, **kw)
    return (y.detach(), *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("shape", [(16, 32), (2, 5, 48), (7, 20)], ids=str)
def test_triton_matches_reference(shape):
    pytest.importorskip("triton")
    x, w, dy = _inputs(shape)
    ref = _fwd_bwd(rms_norm_reference, x, w, dy)
    out = _fwd_bwd(rms_norm, x, w, dy, backend="triton")
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_triton_bf16():
    pytest.importorskip("triton")
    x, w, dy = _inputs((8, 64), dtype=torch.bfloat16)
    ref = _fwd_bwd(rms_norm_reference, x, w, dy)
    out = _fwd_bwd(rms_norm, x, w, dy, backend="triton")
    assert all(t.dtype == torch.bfloat16 for t in out)
    torch.testing.assert_close(out[0].float(), ref[0].float(), rtol=2**-7, atol=2**-7)
    for a, b in zip(out[1:], ref[1:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_is_the_models_rms_norm(dtype):
    x, w, _ = _inputs((4, 24), dtype=dtype)
    torch.testing.assert_close(
        rms_norm_reference(x, w, 1e-6), _rms_norm(x, w, 1e-6), rtol=0, atol=0
    )


def test_auto_uses_the_reference_on_cpu():
    x, w, _ = _inputs((4, 24))
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w), rtol=0, atol=0)


def test_bad_arguments(monkeypatch: pytest.MonkeyPatch):
    x, w, _ = _inputs((4, 24))
    with pytest.raises(ShapeError, match="weight"):
        rms_norm(x, w[:-1])
    with pytest.raises(ShapeError, match="dtypes"):
        rms_norm(x, w.double())
    with pytest.raises(KernelError, match="eps"):
        rms_norm(x, w, -1.0)
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        rms_norm(x, w, backend="triton")
