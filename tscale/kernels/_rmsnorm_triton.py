"""Triton RMSNorm forward and backward (see :mod:`tscale.kernels.rmsnorm`).

Forward: one program per row computes ``rstd = rsqrt(mean(x^2) + eps)`` in fp32, writes
``y = x * rstd * w`` and keeps ``rstd``. Backward: each program takes a contiguous run of rows,
writes ``dx = rstd * (dy*w - xhat * mean(dy*w*xhat))`` and accumulates its share of
``dw = sum_rows dy * xhat`` in fp32 registers; the host sums the per-program partials (the scheme
of the Triton layer-norm tutorial and Liger-Kernel's RMSNorm). Loaded through
:func:`tscale.kernels._dispatch.triton_module`, once per Triton mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscale.kernels._dispatch import interpret_enabled, next_power_of_2, triton_module

# Mode-independent reductions and tanh (Triton's own tl.sum/tl.max are frozen in one mode).
L = triton_module("_triton_lang")


@triton.jit
def _rms_fwd(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(L.sum(x * x, 0) / n_cols + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(
    X,
    W,
    DY,
    DX,
    DW_PARTIAL,
    RSTD,
    stride_x,
    stride_dy,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK], 0.0, tl.float32)
    # int64 row indices: row * stride must not overflow on large activations.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        c = L.sum(g * xhat, 0) / n_cols
        dx = rstd * (g - xhat * c)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _warps(block: int) -> int:
    if interpret_enabled():
        return 1
    return min(max(block // 256, 1), 16)


def rms_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for rows ``x`` [N, H] (last dim contiguous); ``rstd`` is [N] fp32."""
    n, h = x.shape
    y = torch.empty((n, h), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block = next_power_of_2(h)
    _rms_fwd[(n,)](
        x, w, y, rstd, x.stride(0), y.stride(0), h, float(eps), BLOCK=block, num_warps=_warps(block)
    )
    return y, rstd


def rms_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)``; ``dw`` is summed in fp32 and returned in the weight's dtype."""
    n, h = x.shape
    block = next_power_of_2(h)
    programs = 4
    if x.is_cuda and not interpret_enabled():
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = max(min(n, programs), 1)
    rows_per_program = triton.cdiv(n, programs)
    dx = torch.empty((n, h), dtype=x.dtype, device=x.device)
    partial = torch.empty((programs, h), dtype=torch.float32, device=x.device)
    _rms_bwd[(programs,)](
        x,
        w,
        dy,
        dx,
        partial,
        rstd,
        x.stride(0),
        dy.stride(0),
        dx.stride(0),
        n,
        h,
        rows_per_program,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return dx, partial.sum(0).to(w.dtype)
