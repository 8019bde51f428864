"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019) with a Triton kernel.

``rms_norm(x, weight, eps)`` normalises the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``.
On CUDA a Triton kernel computes it in fp32 in one pass over ``x`` and saves only the per-row
``rstd`` for the backward; elsewhere :func:`rms_norm_reference` runs, which is exactly the model's
``_rms_norm`` (HF's Llama convention: normalise in fp32, cast back to the input dtype, then scale).
In fp32 the two agree to rounding; in bf16 the kernel rounds once where the reference rounds
twice (after normalising and after scaling), a difference of at most about one bf16 ulp.
"""

from __future__ import annotations

import torch

from tscale.errors import ShapeError
from tscale.kernels._dispatch import KernelError, triton_module, use_triton

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TRITON_HIDDEN = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`` (the model's form)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """Triton forward/backward over rows [N, H]; saves x and the fp32 ``rstd`` [N]."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_module("_rmsnorm_triton").rms_forward(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, _ = inputs
        _, rstd = output
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _drstd: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx, dw = triton_module("_rmsnorm_triton").rms_backward(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., H] with ``weight`` [H].

    Args:
        x: activations (bf16/fp16/fp32 for the Triton path).
        weight: per-channel scale, same dtype as ``x``.
        eps: added to the mean square.
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (forced: CUDA,
            or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Raises:
        ShapeError: ``weight`` is not ``[H]`` or dtypes differ.
        KernelError: ``eps`` is negative, or a forced backend cannot run here.
    """
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ShapeError(
            f"rms_norm: weight must be [H] with H = x.shape[-1], got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ShapeError(f"rms_norm: x and weight dtypes differ ({x.dtype} vs {weight.dtype})")
    if eps < 0:
        raise KernelError(f"rms_norm: eps must be >= 0, got {eps}")
    unsupported = None
    if x.dtype not in _TRITON_DTYPES:
        unsupported = f"dtype {x.dtype} (Triton kernel: float32, bfloat16, float16)"
    elif x.shape[-1] > MAX_TRITON_HIDDEN:
        unsupported = f"hidden size {x.shape[-1]} > {MAX_TRITON_HIDDEN}"
    if not use_triton(backend, "rms_norm", x, weight, supported=unsupported):
        return rms_norm_reference(x, weight, eps)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y, _ = _RMSNorm.apply(rows, weight.contiguous(), float(eps))
    return y.reshape(shape)
