"""Triton kernels of the fused linear cross-entropy (see :mod:`tscale.kernels.cross_entropy`).

Two row kernels work on one chunk of logits that a cuBLAS matmul has just written:

* ``_ce_fwd_kernel``: one program per token row walks the vocabulary in ``BLOCK_V`` blocks with an
  online log-sum-exp (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018) and
  writes the row's log-sum-exp and loss (label smoothing, z-loss and logit soft-capping included).
* ``_ce_bwd_kernel``: a 2-D grid over (token row, vocabulary block) overwrites the logits with
  ``d loss / d logits`` in place, so the gradient matmuls read it without another buffer.

This is the structure of Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024), with the
backward tiled over the vocabulary as in Cut Cross-Entropy (Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", 2024). Loaded through :func:`tscale.kernels._dispatch.
triton_module`, once per Triton mode (compiled or interpreted).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscale.kernels._dispatch import interpret_enabled, next_power_of_2, triton_module

# Mode-independent reductions and tanh (Triton's own tl.sum/tl.max are frozen in one mode).
L = triton_module("_triton_lang")


@triton.jit
def _ce_fwd_kernel(
    LOGITS,
    stride_row,
    LABELS,
    LOSS,
    LSE,
    V,
    ignore_index,
    smoothing,
    z_coef,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    m = float("-inf")
    d = 0.0
    sum_z = 0.0
    z_y = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * L.tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, L.max(z, 0))
        d = d * tl.exp(m - m_new) + L.sum(tl.exp(z - m_new), 0)
        m = m_new
        sum_z += L.sum(tl.where(mask, z, 0.0), 0)
        z_y += L.sum(tl.where(offs == label, z, 0.0), 0)
    lse = m + tl.log(d)
    loss = lse - (1.0 - smoothing) * z_y - (smoothing / V) * sum_z + z_coef * lse * lse
    tl.store(LOSS + row, tl.where(label != ignore_index, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(
    LOGITS,
    stride_row,
    LABELS,
    LSE,
    SCALE,
    n_cols,
    col_offset,
    V,
    ignore_index,
    smoothing,
    z_coef,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n_cols
    ptrs = LOGITS + row * stride_row + offs
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    g = tl.load(SCALE + row)
    g = tl.where(label != ignore_index, g, 0.0)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = L.tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    p = tl.exp(z - lse)
    target = tl.where((offs + col_offset) == label, 1.0 - smoothing, 0.0)
    dz = p * (1.0 + 2.0 * z_coef * lse) - smoothing / V - target
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    tl.store(ptrs, (dz * g).to(LOGITS.dtype.element_ty), mask=mask)


def _block_v(n: int) -> int:
    # Small blocks in the interpreter so the tiny test vocabularies still take several blocks.
    return 16 if interpret_enabled() else min(next_power_of_2(n), 4096)


def ce_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    lse_out: torch.Tensor,
    *,
    ignore_index: int,
    smoothing: float,
    z_coef: float,
    softcap: float | None,
) -> None:
    """Fill ``loss_out``/``lse_out`` [rows] (fp32) from a row-contiguous logits chunk [rows, V]."""
    rows, v = logits.shape
    block = _block_v(v)
    _ce_fwd_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss_out,
        lse_out,
        v,
        ignore_index,
        float(smoothing),
        float(z_coef),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block,
        num_warps=1 if interpret_enabled() else 8,
    )


def ce_backward_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    *,
    col_offset: int,
    vocab_size: int,
    ignore_index: int,
    smoothing: float,
    z_coef: float,
    softcap: float | None,
) -> None:
    """Overwrite logits [rows, cols] (vocab ``col_offset:``) with ``scale * dloss/dlogits``."""
    rows, cols = logits.shape
    block = _block_v(cols)
    _ce_bwd_kernel[(rows, triton.cdiv(cols, block))](
        logits,
        logits.stride(0),
        labels,
        lse,
        scale,
        cols,
        col_offset,
        vocab_size,
        ignore_index,
        float(smoothing),
        float(z_coef),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block,
        num_warps=1 if interpret_enabled() else 8,
    )
