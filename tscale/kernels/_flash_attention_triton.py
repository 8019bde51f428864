"""Triton FlashAttention-2 forward and backward (see :mod:`tscale.kernels.flash_attention`).

The algorithm of Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023), in the shape of the Triton fused-attention tutorial (Tillet et al.):

* forward: one program per (query block, batch x query head); it streams key/value blocks with an
  online softmax (base-2 exponentials, the scale folded into ``log2(e)``) and stores the output and
  the per-row log-sum-exp (base 2);
* backward: ``delta = rowsum(dO * O)``; one program per (key block, batch x kv head) accumulates
  dK and dV over the query heads of its GQA group (no atomics, no per-query-head copies of dK/dV);
  one program per (query block, batch x query head) accumulates dQ.

Every kernel walks only the blocks that can hold a visible pair: causal and sliding-window bounds
come from the block indices, document bounds from each position's first and last same-document
index (``FIRST``/``LAST``, computed on the host without a sync), so packed documents cost about what
separate sequences would. With shared-prefix branches (``BR``, ``HAS_BRANCH``) a query block walks
two key ranges, its document's prefix (branch 0: ``FIRST``/``LAST``) and its rows' own
(document, branch) groups (``FIRST2``/``LAST2``), skipping sibling completions in between; the
dK/dV kernel's ``FIRST``/``LAST`` are then each key's readers (its document for a prefix key, its
group otherwise). Blocks that are entirely visible skip the mask arithmetic (plain causal and full
attention, sequence a multiple of the block size).

Loaded through :func:`tscale.kernels._dispatch.triton_module`, once per Triton mode.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tscale.kernels._dispatch import interpret_enabled, triton_module

LOG2E = math.log2(math.e)

# Mode-independent reductions and tanh (Triton's own tl.sum/tl.max are frozen in one mode).
L = triton_module("_triton_lang")


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    doc_q,
    br_q,
    offs_m,
    K_ptr,
    V_ptr,
    DOC_ptr,
    BR_ptr,
    stride_kn,
    stride_vn,
    lo,
    hi,
    S,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = softcap2 * L.tanh(qk * scale_over_cap) if HAS_SOFTCAP else qk * qk_scale2
        if MASKED:
            mask = offs_n[None, :] < S
            if CAUSAL:
                mask = mask & (offs_m[:, None] >= offs_n[None, :])
            if HAS_WINDOW:
                mask = mask & (offs_m[:, None] - offs_n[None, :] < window)
            if HAS_DOC:
                doc_k = tl.load(DOC_ptr + offs_n, mask=offs_n < S, other=-1)
                mask = mask & (doc_q[:, None] == doc_k[None, :])
            if HAS_BRANCH:
                br_k = tl.load(BR_ptr + offs_n, mask=offs_n < S, other=0)
                mask = mask & ((br_k[None, :] == 0) | (br_k[None, :] == br_q[:, None]))
            s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, L.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + L.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _clip_to_groups(FIRST_ptr, LAST_ptr, offs, ok, lo, hi, S):
    """``[lo, hi)`` narrowed to the span of the groups (first/last index) of positions ``offs``."""
    first = tl.load(FIRST_ptr + offs, mask=ok, other=S)
    last = tl.load(LAST_ptr + offs, mask=ok, other=-1)
    return tl.maximum(lo, L.min(first, 0)), tl.minimum(hi, L.max(last, 0) + 1)


@triton.jit
def _two_ranges(lo, hi, lo2, hi2, BLOCK: tl.constexpr):
    """Two block ranges that cover ``[lo, hi)`` and ``[lo2, hi2)`` and walk no block twice.

    ``lo`` is block-aligned. The range that starts first is walked in full; the other starts at
    the first block past it (an empty first range clips nothing: its end is not past its start).
    """
    lo2 = (lo2 // BLOCK) * BLOCK
    swap = lo2 < lo
    a_lo = tl.where(swap, lo2, lo)
    a_hi = tl.where(swap, hi2, hi)
    b_lo = tl.where(swap, lo, lo2)
    b_hi = tl.where(swap, hi, hi2)
    b_lo = tl.maximum(b_lo, ((a_hi + BLOCK - 1) // BLOCK) * BLOCK)
    return a_lo, a_hi, b_lo, b_hi


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    DOC,
    FIRST,
    LAST,
    BR,
    FIRST2,
    LAST2,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_db,
    S,
    H,
    GROUP,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    EVEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < S
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs) if EVEN else tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    K_ptr = K + b * stride_kb + hk * stride_kh
    V_ptr = V + b * stride_vb + hk * stride_vh
    DOC_ptr = DOC + b * stride_db

    # Finite start: a row whose first blocks are all masked keeps exp2(m_i - m_new) finite.
    m_i = tl.full([BLOCK_M], 0.0, tl.float32) - 1.0e30
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)

    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, S)
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0)
    doc_q = offs_m
    br_q = offs_m
    BR_ptr = BR + b * stride_db
    lo2 = lo
    hi2 = hi
    if HAS_BRANCH:
        br_q = tl.load(BR_ptr + offs_m, mask=row_ok, other=0)
        lo2, hi2 = _clip_to_groups(
            FIRST2 + b * stride_db, LAST2 + b * stride_db, offs_m, row_ok, lo, hi, S
        )
    if HAS_DOC:
        doc_q = tl.load(DOC_ptr + offs_m, mask=row_ok, other=-2)
        first = tl.load(FIRST + b * stride_db + offs_m, mask=row_ok, other=S)
        last = tl.load(LAST + b * stride_db + offs_m, mask=row_ok, other=-1)
        lo = tl.maximum(lo, L.min(first, 0))
        hi = tl.minimum(hi, L.max(last, 0) + 1)
    lo = (lo // BLOCK_N) * BLOCK_N

    if HAS_BRANCH:
        # Two key ranges: the shared prefix (branch 0) and the rows' own branches; the keys of
        # other branches between them are never walked.
        lo, hi, lo2, hi2 = _two_ranges(lo, hi, lo2, hi2, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo2, hi2, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    elif HAS_DOC or HAS_WINDOW or not EVEN:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    elif CAUSAL:
        # Blocks left of the diagonal are fully visible; the diagonal block is masked.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, 0, m0, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, False,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, m0, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, 0, S, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, False,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * S + offs_m
    if EVEN:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty))
        tl.store(lse_ptrs, m_i + tl.log2(l_safe))
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_preprocess(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    S,
    H,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < S
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, L.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    doc_k,
    br_k,
    offs_n,
    Q_ptr,
    DO_ptr,
    LSE_ptr,
    DELTA_ptr,
    DOC_ptr,
    BR_ptr,
    stride_qm,
    stride_dom,
    lo,
    hi,
    S,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = Q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO_ptr + offs_m[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            row_ok = offs_m < S
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE_ptr + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE_ptr + offs_m)
            delta = tl.load(DELTA_ptr + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if HAS_SOFTCAP:
            t = L.tanh(qkT * scale_over_cap)
            sT = softcap2 * t
        else:
            sT = qkT * qk_scale2
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            mask = offs_m[None, :] < S
            if CAUSAL:
                mask = mask & (offs_m[None, :] >= offs_n[:, None])
            if HAS_WINDOW:
                mask = mask & (offs_m[None, :] - offs_n[:, None] < window)
            if HAS_DOC:
                doc_q = tl.load(DOC_ptr + offs_m, mask=offs_m < S, other=-2)
                mask = mask & (doc_k[:, None] == doc_q[None, :])
            if HAS_BRANCH:
                br_q = tl.load(BR_ptr + offs_m, mask=offs_m < S, other=0)
                mask = mask & ((br_k[:, None] == 0) | (br_k[:, None] == br_q[None, :]))
            pT = tl.where(mask, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    DOC,
    FIRST,
    LAST,
    BR,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_db,
    S,
    H,
    HKV,
    GROUP,
    sm_scale,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    EVEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < S
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    DOC_ptr = DOC + b * stride_db

    # Queries that can see this key block: i >= j (causal), i - j < window, same document.
    lo = 0
    hi = S
    if CAUSAL:
        lo = n0
    if HAS_WINDOW:
        hi = tl.minimum(n0 + BLOCK_N - 1 + window, S)
    doc_k = offs_n
    br_k = offs_n
    BR_ptr = BR + b * stride_db
    if HAS_BRANCH:
        # FIRST/LAST are then the queries' span: the document's for prefix keys (branch 0),
        # the (document, branch) group's for the others.
        br_k = tl.load(BR_ptr + offs_n, mask=col_ok, other=0)
    if HAS_DOC:
        doc_k = tl.load(DOC_ptr + offs_n, mask=col_ok, other=-3)
        first = tl.load(FIRST + b * stride_db + offs_n, mask=col_ok, other=S)
        last = tl.load(LAST + b * stride_db + offs_n, mask=col_ok, other=-1)
        lo = tl.maximum(lo, L.min(first, 0))
        hi = tl.minimum(hi, L.max(last, 0) + 1)
    lo = (lo // BLOCK_M) * BLOCK_M

    dk = tl.full([BLOCK_N, D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, D], 0.0, tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int64)
        Q_ptr = Q + b * stride_qb + h * stride_qh
        DO_ptr = DO + b * stride_dob + h * stride_doh
        LSE_ptr = LSE + bh * S
        DELTA_ptr = DELTA + bh * S
        if HAS_DOC or HAS_BRANCH or HAS_WINDOW or not EVEN:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, doc_k, br_k, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DOC_ptr,
                BR_ptr, stride_qm, stride_dom, lo, hi, S, qk_scale2, scale_over_cap, softcap2,
                window, D, BLOCK_M, True, CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP,
                PRECISION,
            )  # fmt: skip
        elif CAUSAL:
            # The query blocks on the diagonal are masked; those below it see the whole block.
            dk, dv = _dkdv_inner(
                dk, dv, k, v, doc_k, br_k, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DOC_ptr,
                BR_ptr, stride_qm, stride_dom, n0, n0 + BLOCK_N, S, qk_scale2, scale_over_cap,
                softcap2, window, D, BLOCK_M, True, CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW,
                HAS_SOFTCAP, PRECISION,
            )  # fmt: skip
            dk, dv = _dkdv_inner(
                dk, dv, k, v, doc_k, br_k, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DOC_ptr,
                BR_ptr, stride_qm, stride_dom, n0 + BLOCK_N, S, S, qk_scale2, scale_over_cap,
                softcap2, window, D, BLOCK_M, False, CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW,
                HAS_SOFTCAP, PRECISION,
            )  # fmt: skip
        else:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, doc_k, br_k, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DOC_ptr,
                BR_ptr, stride_qm, stride_dom, 0, S, S, qk_scale2, scale_over_cap, softcap2,
                window, D, BLOCK_M, False, CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP,
                PRECISION,
            )  # fmt: skip

    dk = dk * sm_scale
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    if EVEN:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    doc_q,
    br_q,
    offs_m,
    K_ptr,
    V_ptr,
    DOC_ptr,
    BR_ptr,
    stride_kn,
    stride_vn,
    lo,
    hi,
    S,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_SOFTCAP:
            t = L.tanh(qk * scale_over_cap)
            s = softcap2 * t
        else:
            s = qk * qk_scale2
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            mask = offs_n[None, :] < S
            if CAUSAL:
                mask = mask & (offs_m[:, None] >= offs_n[None, :])
            if HAS_WINDOW:
                mask = mask & (offs_m[:, None] - offs_n[None, :] < window)
            if HAS_DOC:
                doc_k = tl.load(DOC_ptr + offs_n, mask=offs_n < S, other=-1)
                mask = mask & (doc_q[:, None] == doc_k[None, :])
            if HAS_BRANCH:
                br_k = tl.load(BR_ptr + offs_n, mask=offs_n < S, other=0)
                mask = mask & ((br_k[None, :] == 0) | (br_k[None, :] == br_q[:, None]))
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    DOC,
    FIRST,
    LAST,
    BR,
    FIRST2,
    LAST2,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_db,
    S,
    H,
    GROUP,
    sm_scale,
    qk_scale2,
    scale_over_cap,
    softcap2,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    EVEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < S
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * S + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * S + offs_m
    if EVEN:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    K_ptr = K + b * stride_kb + hk * stride_kh
    V_ptr = V + b * stride_vb + hk * stride_vh
    DOC_ptr = DOC + b * stride_db

    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, S)
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0)
    doc_q = offs_m
    br_q = offs_m
    BR_ptr = BR + b * stride_db
    lo2 = lo
    hi2 = hi
    if HAS_BRANCH:
        br_q = tl.load(BR_ptr + offs_m, mask=row_ok, other=0)
        lo2, hi2 = _clip_to_groups(
            FIRST2 + b * stride_db, LAST2 + b * stride_db, offs_m, row_ok, lo, hi, S
        )
    if HAS_DOC:
        doc_q = tl.load(DOC_ptr + offs_m, mask=row_ok, other=-2)
        first = tl.load(FIRST + b * stride_db + offs_m, mask=row_ok, other=S)
        last = tl.load(LAST + b * stride_db + offs_m, mask=row_ok, other=-1)
        lo = tl.maximum(lo, L.min(first, 0))
        hi = tl.minimum(hi, L.max(last, 0) + 1)
    lo = (lo // BLOCK_N) * BLOCK_N

    dq = tl.full([BLOCK_M, D], 0.0, tl.float32)
    if HAS_BRANCH:
        # As in the forward: the shared prefix's keys, then the rows' own branches' keys.
        lo, hi, lo2, hi2 = _two_ranges(lo, hi, lo2, hi2, BLOCK_N)
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo2, hi2, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    elif HAS_DOC or HAS_WINDOW or not EVEN:
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, lo, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    elif CAUSAL:
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, 0, m0, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, False,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, m0, hi, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, True,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    else:
        dq = _dq_inner(
            dq, q, do, lse, delta, doc_q, br_q, offs_m, K_ptr, V_ptr, DOC_ptr, BR_ptr, stride_kn,
            stride_vn, 0, S, S, qk_scale2, scale_over_cap, softcap2, window, D, BLOCK_N, False,
            CAUSAL, HAS_DOC, HAS_BRANCH, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    if EVEN:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launchers


def _configs(d: int) -> dict[str, tuple[int, int, int, int]]:
    """Block sizes ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` per kernel.

    Each kernel's outer block is a multiple of its inner block (the diagonal split relies on it).
    The GPU values were picked by compiling for sm_90 on a machine without a GPU and keeping the
    tile shapes that fit the register file (``cuobjdump -res-usage``: no or least spilling, see
    ``docs/kernels.md``); they have not been timed yet.
    """
    if interpret_enabled():
        return {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}
    if d <= 64:
        return {"fwd": (128, 64, 4, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 8, 3)}
    return {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 4, 3), "dq": (128, 32, 8, 3)}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE dots (the tests compare with fp32 references); 16-bit ones use tensor
    # cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(q: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[list[torch.Tensor], int]:
    """The per-position int32 tensors ([B|1, S], one shape) for the kernels, and their batch
    stride (0 when shared by every row); a one-element dummy stands in for each absent one."""
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    present = [t for t in tensors if t is not None]
    stride = 0 if not present or present[0].shape[0] == 1 else present[0].stride(0)
    return [dummy if t is None else t for t in tensors], stride


def _scalars(scale: float, softcap: float | None) -> tuple[float, float, float]:
    """``(qk_scale2, scale_over_cap, softcap2)``: scores in the base-2 domain."""
    if softcap is None:
        return scale * LOG2E, 1.0, 1.0
    return scale * LOG2E, scale / softcap, softcap * LOG2E


def attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor | None,
    first: torch.Tensor | None,
    last: torch.Tensor | None,
    *,
    branch: torch.Tensor | None = None,
    first2: torch.Tensor | None = None,
    last2: torch.Tensor | None = None,
    causal: bool,
    window: int | None,
    softcap: float | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (layout of ``q``) and base-2 log-sum-exp [B, Hq, S] fp32.

    ``doc``, ``first``, ``last``: document ids and each position's document span. With ``branch``
    (branch ids, needs ``doc``) ``first``/``last`` are instead the span of the position's
    document's shared prefix (branch 0) and ``first2``/``last2`` that of its own (document,
    branch) group: see :func:`tscale.kernels.flash_attention.branch_bounds`.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _configs(d)["fwd"]
    (doc_t, first_t, last_t, br_t, f2_t, l2_t), stride_db = _mask_args(
        q, doc, first, last, branch, first2, last2
    )
    qk_scale2, scale_over_cap, softcap2 = _scalars(scale, softcap)
    _attn_fwd[(triton.cdiv(s, bm), b * hq)](
        q, k, v, o, lse, doc_t, first_t, last_t, br_t, f2_t, l2_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        stride_db, s, hq, hq // hkv,
        qk_scale2, scale_over_cap, softcap2, int(window or 0),
        D=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_DOC=doc is not None,
        HAS_BRANCH=branch is not None, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, EVEN=s % bm == 0, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o, lse


def attn_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    doc: torch.Tensor | None,
    first: torch.Tensor | None,
    last: torch.Tensor | None,
    *,
    branch: torch.Tensor | None = None,
    first2: torch.Tensor | None = None,
    last2: torch.Tensor | None = None,
    key_first: torch.Tensor | None = None,
    key_last: torch.Tensor | None = None,
    causal: bool,
    window: int | None,
    softcap: float | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the layouts of ``q``, ``k``, ``v``.

    Mask arguments as :func:`attn_forward`; with ``branch``, ``key_first``/``key_last`` are each
    key's span of queries that may see it (the dK/dV kernel's bounds).
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    cfg = _configs(d)
    if branch is None:
        key_first, key_last = first, last
    (doc_t, first_t, last_t, br_t, f2_t, l2_t, kf_t, kl_t), stride_db = _mask_args(
        q, doc, first, last, branch, first2, last2, key_first, key_last
    )
    qk_scale2, scale_over_cap, softcap2 = _scalars(scale, softcap)
    flags = dict(
        CAUSAL=causal, HAS_DOC=doc is not None, HAS_BRANCH=branch is not None,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION=_precision(q.dtype),
    )  # fmt: skip

    delta = torch.empty_like(lse)
    pre_m = 32 if interpret_enabled() else 64  # 64 x D fp32 tiles of o and do fit registers
    _bwd_preprocess[(triton.cdiv(s, pre_m), b * hq)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        s, hq, D=d, BLOCK_M=pre_m,
    )  # fmt: skip

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bm, bn, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(s, bn), b * hkv)](
        q, k, v, do, dk, dv, lse, delta, doc_t, kf_t, kl_t, br_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_db, s, hq, hkv, hq // hkv,
        scale, qk_scale2, scale_over_cap, softcap2, int(window or 0),
        D=d, BLOCK_M=bm, BLOCK_N=bn, EVEN=s % bn == 0, num_warps=warps, num_stages=stages,
        **flags,
    )  # fmt: skip

    dq = torch.empty_like(q)
    bm, bn, warps, stages = cfg["dq"]
    _attn_bwd_dq[(triton.cdiv(s, bm), b * hq)](
        q, k, v, do, dq, lse, delta, doc_t, first_t, last_t, br_t, f2_t, l2_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_db, s, hq, hq // hkv,
        scale, qk_scale2, scale_over_cap, softcap2, int(window or 0),
        D=d, BLOCK_M=bm, BLOCK_N=bn, EVEN=s % bm == 0, num_warps=warps, num_stages=stages,
        **flags,
    )  # fmt: skip
    return dq, dk, dv
