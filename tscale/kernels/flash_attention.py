"""Scaled dot-product attention for training: causal, GQA/MQA, packed documents, sliding window.

``attention(q, k, v)`` dispatches to a Triton FlashAttention-2 kernel (Dao, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", 2023) on CUDA and to PyTorch's
``scaled_dot_product_attention`` elsewhere; :func:`attention_reference` is the explicit fp32
masked softmax both are tested against.

Visibility of key ``j`` from query ``i`` (all conditions that are switched on must hold):

* ``causal``: ``j <= i``;
* ``doc_ids``: ``doc_ids[b, i] == doc_ids[b, j]`` (packed documents never see each other; equality,
  exactly like the model's block-diagonal mask, so ids need not be sorted);
* ``cu_seqlens``: the same, with documents given by their boundaries (FlashAttention's packed
  varlen form ``[0, len_0, len_0 + len_1, ..., total]``, shared by every batch row);
* ``branch_ids``: ``branch_ids[b, j] == 0 or branch_ids[b, j] == branch_ids[b, i]`` (shared-prefix
  groups: several completions packed after one prompt in one document; the prompt has branch 0
  and is seen by every branch, each completion has its own id and sees only itself and the
  prompt, so a token computes what it computes in the unpacked ``prompt + its completion``).
  Branch ids are compared within a document only; without ``doc_ids`` the row is one document;
* ``window``: ``i - j < window`` (each query sees itself and the ``window - 1`` keys before it, the
  Mistral/Gemma convention).

``softcap`` applies ``softcap * tanh(scores / softcap)`` to the scaled scores before the softmax
(Gemma 2).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from tscale.errors import ShapeError
from tscale.kernels._dispatch import KernelError, triton_module, use_triton

TRITON_HEAD_DIMS = (16, 32, 64, 128)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@attrs.frozen
class _Options:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Document ids [1, seq_len] (int32) from boundaries ``[0, l0, l0 + l1, ..., total]``.

    Positions at or past ``cu_seqlens[-1]`` (padding) form one more document. No host sync.
    """
    pos = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True).to(torch.int32)[None]


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the first and last index with the same document id (int32, [B, S]).

    The kernels use them to skip blocks that share no document with the current block. A stable
    sort groups equal ids with their indices ascending, so group ends give the extreme indices;
    everything stays on the device.
    """
    b, s = doc_ids.shape
    srt, perm = torch.sort(doc_ids, dim=-1, stable=True)
    pos = torch.arange(s, device=doc_ids.device).expand(b, s)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    start_pos = torch.where(new, pos, 0).cummax(dim=-1).values
    end_pos = torch.where(end, pos, s - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    first = torch.empty_like(perm).scatter_(-1, perm, perm.gather(-1, start_pos))
    last = torch.empty_like(perm).scatter_(-1, perm, perm.gather(-1, end_pos))
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def _spans(
    keys: torch.Tensor, perm: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index whose key equals ``targets`` (S and -1 where none); ``keys`` sorted
    stably (``perm``: their original indices, ascending among equal keys)."""
    s = keys.shape[-1]
    left = torch.searchsorted(keys, targets)
    right = torch.searchsorted(keys, targets, right=True)
    found = left < right
    first = torch.where(found, perm.gather(-1, left.clamp(max=s - 1)), s)
    last = torch.where(found, perm.gather(-1, (right - 1).clamp(min=0)), -1)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def branch_bounds(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The spans the kernels skip blocks by under shared-prefix branches (int32, [B, S] each).

    Returns ``(prefix_first, prefix_last, own_first, own_last, key_first, key_last)``: for each
    position, the first and last index of its document's prefix (branch 0; S and -1 when the
    document has none), of its own (document, branch) group, and of the queries that may see it
    as a key (its document for a prefix token, its own group otherwise). A query's keys lie in
    the prefix span or its own span; a branch's keys between them are never visited. One stable
    sort and binary searches on the device, no host sync. ``doc_ids`` and ``branch_ids`` are
    [B, S] of one shape, int32.
    """
    key = doc_ids.to(torch.int64) * 2**32 + (branch_ids.to(torch.int64) & 0xFFFFFFFF)
    srt, perm = torch.sort(key, dim=-1, stable=True)
    prefix_first, prefix_last = _spans(srt, perm, doc_ids.to(torch.int64) * 2**32)
    own_first, own_last = _spans(srt, perm, key)
    doc_first, doc_last = document_bounds(doc_ids)
    shared = branch_ids == 0
    key_first = torch.where(shared, doc_first, own_first).contiguous()
    key_last = torch.where(shared, doc_last, own_last).contiguous()
    return prefix_first, prefix_last, own_first, own_last, key_first, key_last


def _check_ids(name: str, ids: torch.Tensor | None, b: int, s: int) -> None:
    if ids is not None and (
        ids.dim() != 2
        or ids.shape[0] not in (1, b)
        or ids.shape[1] != s
        or ids.dtype.is_floating_point
    ):
        raise ShapeError(
            f"attention: {name} must be integers [{b}, {s}] (or [1, {s}]), got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    doc_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    window: int | None,
    softcap: float | None,
    branch_ids: torch.Tensor | None = None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ShapeError(
            f"attention: q must be [B, Hq, S, D] and k, v [B, Hkv, S, D], got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ShapeError(
            f"attention: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence "
            f"and head dim (self-attention over one sequence)"
        )
    if hq % k.shape[1]:
        raise ShapeError(
            f"attention: {k.shape[1]} key/value heads must divide {hq} query heads (GQA groups)"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ShapeError(
            f"attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if doc_ids is not None and cu_seqlens is not None:
        raise KernelError("attention: pass doc_ids or cu_seqlens, not both")
    _check_ids("doc_ids", doc_ids, b, s)
    _check_ids("branch_ids", branch_ids, b, s)
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point):
        raise ShapeError(
            f"attention: cu_seqlens must be a 1-D integer tensor [num_docs + 1], got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise KernelError(f"attention: window must be a positive int or None, got {window!r}")
        if not causal:
            raise KernelError("attention: window needs causal=True (a causal sliding window)")
    if softcap is not None and not softcap > 0:
        raise KernelError(f"attention: softcap must be > 0 or None, got {softcap}")


def _mask(
    s: int,
    device: torch.device,
    causal: bool,
    doc_ids: torch.Tensor | None,
    window: int | None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean visibility [B|1, 1, S, S] (True: attend), or None for full attention."""
    if not causal and doc_ids is None and branch_ids is None:
        return None
    i = torch.arange(s, device=device)
    mask = torch.ones((s, s), dtype=torch.bool, device=device)
    if causal:
        mask = mask & (i[None, :] <= i[:, None])
    if window is not None:
        mask = mask & (i[:, None] - i[None, :] < window)
    mask = mask[None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if branch_ids is not None:
        key = branch_ids[:, None, :]
        mask = mask & ((key == 0) | (key == branch_ids[:, :, None]))
    return mask[:, None]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit masked softmax in fp32 (fp64 stays fp64): the definition the kernels must match.

    Same arguments as :func:`attention`; materialises the [B, Hq, S, S] scores.
    """
    _validate(q, k, v, causal, doc_ids, cu_seqlens, window, softcap, branch_ids)
    _, hq, s, d = q.shape
    if cu_seqlens is not None:
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, s)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = hq // k.shape[1]
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ kf.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = _mask(s, q.device, causal, doc_ids, window, branch_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)


def _attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    doc_ids: torch.Tensor | None,
    window: int | None,
    softcap: float | None,
    scale: float | None,
    branch_ids: torch.Tensor | None,
) -> torch.Tensor:
    """PyTorch path: SDPA with a boolean mask (its fused backends where they apply)."""
    if softcap is not None:  # SDPA has no soft-cap: the explicit softmax
        return attention_reference(
            q,
            k,
            v,
            causal=causal,
            doc_ids=doc_ids,
            window=window,
            softcap=softcap,
            scale=scale,
            branch_ids=branch_ids,
        )
    mask = None
    if doc_ids is not None or window is not None or branch_ids is not None:
        mask = _mask(q.shape[2], q.device, causal, doc_ids, window, branch_ids)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


@attrs.frozen
class _MaskTensors:
    """The kernels' per-position int32 tensors ([B|1, S], one shape): document ids and spans
    (``first``/``last``: the document's, or the shared prefix's with branches) and, with
    branches, the branch ids and the spans of :func:`branch_bounds`."""

    doc: torch.Tensor | None = None
    first: torch.Tensor | None = None
    last: torch.Tensor | None = None
    branch: torch.Tensor | None = None
    first2: torch.Tensor | None = None
    last2: torch.Tensor | None = None
    key_first: torch.Tensor | None = None
    key_last: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return attrs.astuple(self, recurse=False)


def _mask_tensors(
    doc_ids: torch.Tensor | None, branch_ids: torch.Tensor | None, s: int
) -> _MaskTensors:
    if branch_ids is None:
        if doc_ids is None:
            return _MaskTensors()
        doc = doc_ids.to(torch.int32).contiguous()
        first, last = document_bounds(doc)
        return _MaskTensors(doc, first, last)
    rows = max(branch_ids.shape[0], 1 if doc_ids is None else doc_ids.shape[0])
    branch = branch_ids.to(torch.int32).expand(rows, s).contiguous()
    # Without doc_ids the row is one document (the kernels' branch spans come from doc ids).
    doc = torch.zeros_like(branch) if doc_ids is None else doc_ids.to(torch.int32)
    doc = doc.expand(rows, s).contiguous()
    prefix_first, prefix_last, own_first, own_last, key_first, key_last = branch_bounds(doc, branch)
    return _MaskTensors(
        doc, prefix_first, prefix_last, branch, own_first, own_last, key_first, key_last
    )


class _FlashAttention(torch.autograd.Function):
    """Triton FlashAttention-2 forward/backward; saves q, k, v, o and the row log-sum-exp."""

    @staticmethod
    def forward(  # type: ignore[override]
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: _Options,
        *mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kern = triton_module("_flash_attention_triton")
        m = _MaskTensors(*mask)
        return kern.attn_forward(
            q,
            k,
            v,
            m.doc,
            m.first,
            m.last,
            branch=m.branch,
            first2=m.first2,
            last2=m.last2,
            causal=o.causal,
            window=o.window,
            softcap=o.softcap,
            scale=o.scale,
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        q, k, v, o, *mask = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *mask)
        ctx.o = o
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do: torch.Tensor, _dlse: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse, *mask = ctx.saved_tensors
        m = _MaskTensors(*mask)
        o = ctx.o
        kern = triton_module("_flash_attention_triton")
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = kern.attn_backward(
            do,
            q,
            k,
            v,
            out,
            lse,
            m.doc,
            m.first,
            m.last,
            branch=m.branch,
            first2=m.first2,
            last2=m.last2,
            key_first=m.key_first,
            key_last=m.key_last,
            causal=o.causal,
            window=o.window,
            softcap=o.softcap,
            scale=o.scale,
        )
        return (dq, dk, dv, None, *(None for _ in mask))


def _triton_unsupported(q: torch.Tensor) -> str | None:
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        return f"head dim {d} (Triton kernel: {TRITON_HEAD_DIMS})"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} (Triton kernel: float32, bfloat16, float16)"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention output [B, Hq, S, D] in the dtype and layout of ``q``.

    FlashAttention-2 (Dao, 2023) in Triton on CUDA: O(S) memory, fp32 accumulation, the backward
    recomputes the attention probabilities from the saved log-sum-exp.

    Args:
        q: ``[B, Hq, S, D]`` queries; any strides with a contiguous last dim (a
            ``[B, S, H, D]`` tensor transposed to ``[B, H, S, D]`` is used without a copy).
        k: ``[B, Hkv, S, D]`` keys; ``Hkv`` divides ``Hq`` (GQA; 1 is MQA).
        v: ``[B, Hkv, S, D]`` values.
        causal: a query sees only keys at or before it.
        doc_ids: ``[B|1, S]`` integer document ids of packed rows (see the module docstring).
        cu_seqlens: ``[num_docs + 1]`` document boundaries (instead of ``doc_ids``).
        branch_ids: ``[B|1, S]`` integer branch ids of shared-prefix groups: 0 for the shared
            prompt (seen by every branch of its document), ``k > 0`` for the tokens of branch
            ``k`` (seen by branch ``k`` only); see the module docstring. Combines with
            ``doc_ids``/``cu_seqlens``, the window and the soft-cap.
        window: sliding window length (needs ``causal``); None attends to the whole prefix.
        softcap: soft-cap of the scaled scores (None disables).
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA for head dims 16/32/64/128, else PyTorch SDPA),
            ``"triton"`` (forced: CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Raises:
        ShapeError: shapes or dtypes disagree.
        KernelError: an option is out of range, or a forced backend cannot run here.
    """
    _validate(q, k, v, causal, doc_ids, cu_seqlens, window, softcap, branch_ids)
    s, d = q.shape[2], q.shape[3]
    if cu_seqlens is not None:
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, s)
    if not use_triton(backend, "attention", q, k, v, supported=_triton_unsupported(q)):
        return _attention_torch(
            q,
            k,
            v,
            causal=causal,
            doc_ids=doc_ids,
            window=window,
            softcap=softcap,
            scale=scale,
            branch_ids=branch_ids,
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = _mask_tensors(doc_ids, branch_ids, s)
    o = _Options(
        causal=bool(causal),
        window=window,
        softcap=None if softcap is None else float(softcap),
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(d),
    )
    out, _ = _FlashAttention.apply(q, k, v, o, *mask.tensors())
    return out
