"""Fused linear cross-entropy: the LM head and the token loss without the N x V logits.

``linear_cross_entropy(hidden, weight, labels)`` equals ``F.cross_entropy(hidden @ weight.T, labels,
reduction="sum")`` (plus the options below) but holds at most one chunk of logits at a time:

* **Forward** walks the tokens in chunks: a matmul writes ``[chunk, V]`` logits (in the input
  dtype, like the reference ``(hidden @ weight.T).float()``), a row kernel reduces them with an
  online log-sum-exp to each token's ``lse`` and loss in fp32. Only ``lse`` ([N] fp32) is kept.
* **Backward recomputes.** It walks the *vocabulary* in chunks: ``logits[:, v] = hidden @ W[v].T``,
  the kernel overwrites them in place with ``g_t * dloss/dlogits`` (softmax from the saved ``lse``),
  then ``grad_W[v] = dlogits.T @ hidden`` (one matmul over all tokens, fp32 accumulation inside)
  and ``grad_hidden += dlogits @ W[v]`` (an [N, H] fp32 accumulator).

Why recompute rather than compute the gradients in the forward (as Liger-Kernel does): the
gradients need ``lse``, which is only known once a row has seen the whole vocabulary, so a one-pass
scheme must tile over tokens and accumulate ``grad_W`` across token chunks — either in a [V, H] fp32
buffer (2 GB at V=128256, H=4096) or in bf16 with one rounding per chunk. Tiling the backward over
the vocabulary instead gives every ``grad_W`` row in one fp32-accumulated matmul and needs only an
[N, H] fp32 buffer, at the cost of one more logits matmul (4 instead of 3 ``N·V·H`` matmuls). It
also keeps nothing but ``lse`` between forward and backward, does no gradient work in evaluation
or under ``torch.no_grad``, and scales correctly by any incoming gradient (``reduction="none"``
gets per-token gradients). Cut Cross-Entropy (Wijmans et al., 2024) recomputes likewise.

The matmuls are cuBLAS (``torch.mm``); Triton fuses everything between them (soft-cap, online
log-sum-exp, smoothing, z-loss, the softmax gradient) so no fp32 copy of a chunk is made. On CPU
the same two-pass algorithm runs with PyTorch row operations (:func:`linear_cross_entropy_chunked`).

Loss per trained token ``t`` (logits ``z``, soft-capped first when ``softcap`` is set:
``z = softcap * tanh(z / softcap)``, as Gemma 2's final-logit capping)::

    lse - (1 - eps) * z[y] - eps * mean(z) + z_loss * lse**2

which is ``F.cross_entropy(z, y, label_smoothing=eps)`` plus PaLM's z-loss (Chowdhery et al., 2022).
Ignored tokens (``label == ignore_index``) contribute 0 and get no gradient.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from tscale.errors import ShapeError
from tscale.kernels._dispatch import KernelError, triton_module, use_triton

Reduction = Literal["sum", "mean", "none"]

DEFAULT_CHUNK_BYTES = 512 * 2**20
"""Budget for one chunk of logits: forward [tokens, V] and backward [N, vocab] chunks are sized to
stay under it (512 MiB: 2048 tokens x 128256 vocab in bf16)."""

REFERENCE_MAX_LOGITS = 2**24
"""On the PyTorch path, calls with N*V up to this many logits use the plain reference (faster for
small problems); larger ones use the chunked algorithm."""

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@attrs.frozen
class _Options:
    ignore_index: int
    smoothing: float
    z_loss: float
    softcap: float | None
    chunk_bytes: int
    impl: Literal["triton", "torch"]


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ShapeError(
            f"linear_cross_entropy: hidden [..., H] and weight [V, H] must agree in H, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.dtype.is_floating_point:
        raise ShapeError(
            f"linear_cross_entropy: labels must be integers shaped like hidden without its last "
            f"dim {tuple(hidden.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ShapeError(
            f"linear_cross_entropy: hidden and weight must share a float dtype, got "
            f"{hidden.dtype} and {weight.dtype}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise KernelError(
            f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}"
        )
    if z_loss < 0.0:
        raise KernelError(f"linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise KernelError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if reduction not in ("sum", "mean", "none"):
        raise KernelError(
            f"linear_cross_entropy: reduction must be 'sum', 'mean' or 'none', got {reduction!r}"
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(
    losses: torch.Tensor, tokens: torch.Tensor, reduction: str, shape: torch.Size
) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / tokens.clamp(min=1)
    return losses.reshape(shape)


def _losses_from_logits(
    z: torch.Tensor, labels: torch.Tensor, o: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and lse from float logits [n, V] (PyTorch row operations)."""
    eps, softcap = o.smoothing, o.softcap
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != o.ignore_index
    z_y = z.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    loss = lse - (1.0 - eps) * z_y
    if eps:
        loss = loss - eps * z.mean(dim=-1)
    if o.z_loss:
        loss = loss + o.z_loss * lse.square()
    return torch.where(valid, loss, 0.0), lse


def _dlogits_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    v0: int,
    vocab: int,
    o: _Options,
) -> torch.Tensor:
    """``scale * dloss/dlogits`` for float logits ``x`` [N, cols] = vocabulary ``v0:v0+cols``."""
    if o.softcap is not None:
        t = torch.tanh(x / o.softcap)
        z = o.softcap * t
    else:
        z = x
    dz = torch.exp(z - lse[:, None])
    if o.z_loss:
        dz = dz * (1.0 + 2.0 * o.z_loss * lse[:, None])
    if o.smoothing:
        dz = dz - o.smoothing / vocab
    cols = torch.arange(v0, v0 + x.shape[1], device=x.device)
    dz = dz - (1.0 - o.smoothing) * (cols[None, :] == labels[:, None]).to(dz.dtype)
    if o.softcap is not None:
        dz = dz * (1.0 - t * t)
    g = torch.where(labels != o.ignore_index, scale, 0.0)
    return dz * g[:, None]


def _chunk(total: int, other: int, elem_bytes: int, budget: int, multiple: int) -> int:
    n = max(1, budget // max(1, other * elem_bytes))
    if n >= multiple:
        n -= n % multiple
    return min(n, total)


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, o: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    losses = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    if o.impl == "triton":
        kern = triton_module("_cross_entropy_triton")
        step = _chunk(n, vocab, hidden.element_size(), o.chunk_bytes, 64)
    else:
        step = _chunk(n, vocab, 4 * 3, o.chunk_bytes, 64)  # fp32 logits + two temporaries
    for s in range(0, n, step):
        e = min(s + step, n)
        logits = hidden[s:e] @ weight.T
        if o.impl == "triton":
            kern.ce_forward(
                logits,
                labels[s:e],
                losses[s:e],
                lse[s:e],
                ignore_index=o.ignore_index,
                smoothing=o.smoothing,
                z_coef=o.z_loss,
                softcap=o.softcap,
            )
        else:
            losses[s:e], lse[s:e] = _losses_from_logits(logits.to(acc), labels[s:e], o)
    return losses, lse


def _backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    o: _Options,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    if o.impl == "triton":
        kern = triton_module("_cross_entropy_triton")
        step = _chunk(vocab, n, hidden.element_size(), o.chunk_bytes, 128)
    else:
        step = _chunk(vocab, n, 4 * 4, o.chunk_bytes, 128)
    for v0 in range(0, vocab, step):
        v1 = min(v0 + step, vocab)
        w_v = weight[v0:v1]
        logits = hidden @ w_v.T
        if o.impl == "triton":
            kern.ce_backward_(
                logits,
                labels,
                lse,
                scale,
                col_offset=v0,
                vocab_size=vocab,
                ignore_index=o.ignore_index,
                smoothing=o.smoothing,
                z_coef=o.z_loss,
                softcap=o.softcap,
            )
            dlogits = logits
        else:
            dlogits = _dlogits_torch(logits.to(acc), labels, lse, scale, v0, vocab, o)
            dlogits = dlogits.to(hidden.dtype)
        if grad_w is not None:
            if torch.is_grad_enabled():  # torch.func runs backwards with grad mode on: no out=
                grad_w[v0:v1] = dlogits.T @ hidden
            else:  # straight into grad_W, no [chunk, H] temporary
                torch.mm(dlogits.T, hidden, out=grad_w[v0:v1])
        if grad_h is not None:
            grad_h += (dlogits @ w_v).to(acc)
        del logits, dlogits
    return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] of ``hidden @ weight.T``; the backward recomputes logits by vocab chunk.

    New-style (``setup_context``) so ``torch.func.grad`` can differentiate through it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, o: _Options
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(hidden, weight, labels, o)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        hidden, weight, labels, o = inputs
        _, lse = output
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.o = o
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor, _grad_lse: torch.Tensor):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_losses.to(lse.dtype).expand(lse.shape).contiguous()
        grad_h, grad_w = _backward(hidden, weight, labels, lse, scale, ctx.o, need_h, need_w)
        return grad_h, grad_w, None, None


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    chunk_bytes: int | None,
    impl: Literal["triton", "torch"],
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if impl == "triton":
        h2, y = h2.contiguous(), y.contiguous()
    o = _Options(
        ignore_index=int(ignore_index),
        smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk_bytes=int(chunk_bytes or DEFAULT_CHUNK_BYTES),
        impl=impl,
    )
    tokens = (y != ignore_index).sum()
    losses, _ = _LinearCrossEntropy.apply(h2, weight, y, o)
    return _reduce(losses, tokens, reduction, shape), tokens


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Reduction = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch definition: ``(hidden @ weight.T).float()`` then cross-entropy.

    Materialises all N x V logits (in fp32; fp64 stays fp64). Same arguments and returns as
    :func:`linear_cross_entropy`.
    """
    _validate(hidden, weight, labels, label_smoothing, z_loss, softcap, reduction)
    logits = (hidden @ weight.T).to(_acc_dtype(hidden.dtype))
    logits = logits.reshape(-1, weight.shape[0])
    y = labels.reshape(-1)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(
        logits, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = y != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.where(valid, torch.logsumexp(logits, -1), 0.0).square()
    tokens = valid.sum()
    return _reduce(losses, tokens, reduction, labels.shape), tokens


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Reduction = "sum",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked two-pass algorithm in pure PyTorch (memory-efficient on any device).

    Same arguments and returns as :func:`linear_cross_entropy`; never holds more than one chunk of
    fp32 logits (about ``chunk_bytes``).
    """
    _validate(hidden, weight, labels, label_smoothing, z_loss, softcap, reduction)
    return _run(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        chunk_bytes=chunk_bytes,
        impl="torch",
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Reduction = "sum",
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    Liger-Kernel-style fused linear cross-entropy (Hsu et al., "Liger Kernel", 2024) with a
    vocabulary-tiled, recomputing backward as in Cut Cross-Entropy (Wijmans et al., 2024); see the
    module docstring for the algorithm and why the backward recomputes.

    Args:
        hidden: ``[..., H]`` final hidden states (bf16/fp16/fp32; fp64 on the PyTorch path).
        weight: ``[V, H]`` LM-head (or tied embedding) weight, same dtype as ``hidden``.
        labels: ``[...]`` integer targets in ``[0, V)``, pre-shifted, ``ignore_index`` where not
            trained.
        ignore_index: label value that is not trained.
        label_smoothing: ``eps`` in ``[0, 1]``, as ``F.cross_entropy``.
        z_loss: coefficient of ``lse**2`` added per trained token (0 disables).
        softcap: soft-cap the logits as ``softcap * tanh(z / softcap)`` first (None disables).
        reduction: ``"sum"`` (the project's convention), ``"mean"`` over trained tokens, or
            ``"none"`` (per-token losses shaped like ``labels``, 0 where ignored).
        backend: ``"auto"`` (Triton on CUDA; on CPU the reference when N·V <=
            ``REFERENCE_MAX_LOGITS``, else the chunked PyTorch algorithm), ``"triton"`` (forced:
            CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (the choice ``auto`` makes
            on CPU).
        chunk_bytes: budget of one logits chunk (default :data:`DEFAULT_CHUNK_BYTES`).

    Returns:
        ``(loss, tokens)``: the fp32 loss (fp64 for fp64 inputs) reduced as asked, and the 0-d
        int64 count of trained tokens.

    Raises:
        ShapeError: shapes or dtypes disagree.
        KernelError: an option is out of range, or a forced backend cannot run here.
    """
    _validate(hidden, weight, labels, label_smoothing, z_loss, softcap, reduction)
    unsupported = None
    if hidden.dtype not in _TRITON_DTYPES:
        unsupported = f"dtype {hidden.dtype} (Triton path: float32, bfloat16, float16)"
    if use_triton(backend, "linear_cross_entropy", hidden, weight, labels, supported=unsupported):
        impl: Literal["triton", "torch"] = "triton"
    elif labels.numel() * weight.shape[0] <= REFERENCE_MAX_LOGITS:
        return linear_cross_entropy_reference(
            hidden,
            weight,
            labels,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
        )
    else:
        impl = "torch"
    return _run(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        chunk_bytes=chunk_bytes,
        impl=impl,
    )
