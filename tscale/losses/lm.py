"""Token cross-entropy for language modelling, as a sum plus a token count.

Labels are *pre-shifted*: ``labels[b, t]`` is the target of the prediction at position ``t``
(``ignore_index`` where nothing is trained). Losses return sums; the step divides by the token count
of the whole accumulated (and, under data parallelism, all-rank) batch, so neither gradient
accumulation nor world size changes the gradient.

Two builders give the same loss: :func:`make_lm_loss` over a model's logits, and
:func:`make_fused_lm_loss` over its final hidden states and head weight through
:func:`tscale.kernels.linear_cross_entropy`, which never holds the [tokens, vocab] logits on the
kernel path. Both take label smoothing and PaLM's z-loss with the kernel's semantics: per trained
token ``lse - (1 - eps) * z[y] - eps * mean(z) + z_loss * lse**2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from tscale.errors import ConfigError
from tscale.kernels import linear_cross_entropy
from tscale.kernels._dispatch import BACKENDS

IGNORE_INDEX = -100

ApplyFn = Callable[[TensorDictBase, Any], torch.Tensor]
LossFn = Callable[[TensorDictBase, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]


class HeadModel(Protocol):
    """What :func:`make_fused_lm_loss` needs of a model: the part of the model protocol
    (:class:`tscale.models.protocol.LanguageModel`) that feeds the LM head. A ``Transformer``
    has it, and so has every wrapper of it (LoRA, dtype cast, FSDP gather)."""

    def hidden_states(self, params: TensorDictBase, batch: Any, **kw: Any) -> torch.Tensor:
        """Final-normed hidden states [..., H], the input of the LM head."""
        ...

    def head_weight(self, params: TensorDictBase, **kw: Any) -> torch.Tensor:
        """The LM head's weight [V, H] as the model computes with it (tied, adapted …)."""
        ...


def _softcap(model: Any) -> float | None:
    """The final logit soft-cap of a model: the protocol's ``final_logit_softcap``, else (an
    older model record) its ``config.final_logit_softcap``."""
    if hasattr(model, "final_logit_softcap"):
        return model.final_logit_softcap
    return getattr(getattr(model, "config", None), "final_logit_softcap", None)


def _frozen_kw(frozen: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if frozen is None else {"frozen": frozen}


def _check_options(where: str, label_smoothing: float, z_loss: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"{where}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ConfigError(f"{where}: z_loss must be a finite number >= 0, got {z_loss}")


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the non-ignored tokens, computed in at least float32.

    Args:
        logits: ``[..., V]`` scores.
        labels: ``[...]`` integer targets, ``ignore_index`` where not trained.
        ignore_index: label value that is not trained.
        label_smoothing: ``eps`` in ``[0, 1]``, as ``F.cross_entropy``.
        z_loss: coefficient of ``logsumexp(logits)**2`` added per trained token (0 disables).

    Returns:
        ``(loss_sum, tokens)``: a 0-d float32 sum (float64 for float64 logits) and the 0-d
        int64 count of trained tokens.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype not in (torch.float32, torch.float64):
        flat_logits = flat_logits.float()  # bf16/fp16 logits: the softmax runs in float32
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    loss_sum = F.cross_entropy(
        flat_logits,
        flat_labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    if z_loss:
        lse = torch.logsumexp(flat_logits, dim=-1)
        loss_sum = loss_sum + z_loss * torch.where(valid, lse, 0.0).square().sum()
    tokens = valid.sum()
    return loss_sum, tokens


def target_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The labels the model's logits line up with: ``labels`` [B, S], or the labels at
    ``logits_index`` [B, M] when the batch has one (the model then computes logits only there)."""
    labels = batch["labels"]
    index = batch.get("logits_index", None)
    return labels if index is None else labels.gather(1, index)


def make_lm_loss(
    apply_fn: ApplyFn,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> LossFn:
    """A loss ``loss_fn(params, batch) -> (loss_sum, {"tokens": n})`` for ``apply_fn``'s logits.

    ``loss_fn(params, batch, frozen=trees)`` hands the train state's frozen trees on as
    ``apply_fn(params, batch, frozen=trees)`` (a model of :mod:`tscale.models.protocol`).

    Raises:
        ConfigError: ``label_smoothing`` outside ``[0, 1]`` or a negative ``z_loss``.
    """
    _check_options("make_lm_loss", label_smoothing, z_loss)

    def loss_fn(
        params: TensorDictBase,
        batch: Mapping[str, torch.Tensor],
        *,
        frozen: Mapping[str, Any] | None = None,
    ):
        logits = apply_fn(params, batch, **_frozen_kw(frozen))
        loss_sum, tokens = token_cross_entropy(
            logits,
            target_labels(batch),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
        return loss_sum, {"tokens": tokens}

    return loss_fn


def make_fused_lm_loss(
    model: HeadModel,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_bytes: int | None = None,
    backend: str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> LossFn:
    """:func:`make_lm_loss`'s loss without the logits: the LM head fused into the cross-entropy.

    ``loss_fn(params, batch)`` computes ``model.hidden_states(params, batch)`` and hands them with
    ``model.head_weight(params)`` to :func:`tscale.kernels.linear_cross_entropy`
    (``reduction="sum"``), with ``softcap=model.final_logit_softcap`` (Gemma 2) so the loss
    is that of the model's own logits. ``model`` is any model of the protocol
    (:mod:`tscale.models.protocol`): a ``Transformer``, a ``LoraModel`` (the adapted head when
    ``lm_head`` is a target), a ``CastModel``, FSDP's ``ShardedModel`` (hidden states and the
    head weight each gathered); ``loss_fn(params, batch, frozen=trees)`` hands frozen trees on.
    On CUDA (``backend="auto"``) the Triton kernel holds at
    most one ``chunk_bytes`` chunk of logits; on CPU small problems use the plain reference and
    large ones the chunked PyTorch algorithm (see ``docs/kernels.md``).

    Args:
        model: a model with ``hidden_states``, ``head_weight`` and ``final_logit_softcap``
            (or, as older records, ``config.final_logit_softcap``).
        ignore_index: label value that is not trained.
        chunk_bytes: budget of one logits chunk (default the kernel's, 512 MiB).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``linear_cross_entropy``).
        label_smoothing: ``eps`` in ``[0, 1]``.
        z_loss: coefficient of ``lse**2`` per trained token.

    Returns:
        ``loss_fn(params, batch) -> (loss_sum, {"tokens": n})``, a drop-in for
        :func:`make_lm_loss` in ``make_train_step``/``make_eval_step``.

    Raises:
        ConfigError: an unknown ``backend``, ``label_smoothing`` outside ``[0, 1]``, a negative
            ``z_loss`` or a non-positive ``chunk_bytes``.
    """
    _check_options("make_fused_lm_loss", label_smoothing, z_loss)
    if backend not in BACKENDS:
        raise ConfigError(f"make_fused_lm_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_bytes is not None and not chunk_bytes > 0:
        raise ConfigError(f"make_fused_lm_loss: chunk_bytes must be > 0, got {chunk_bytes}")
    softcap = _softcap(model)

    def loss_fn(
        params: TensorDictBase,
        batch: Mapping[str, torch.Tensor],
        *,
        frozen: Mapping[str, Any] | None = None,
    ):
        kw = _frozen_kw(frozen)
        hidden = model.hidden_states(params, batch, **kw)
        loss_sum, tokens = linear_cross_entropy(
            hidden,
            model.head_weight(params, **kw),
            target_labels(batch),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            reduction="sum",
            backend=backend,
            chunk_bytes=chunk_bytes,
        )
        return loss_sum, {"tokens": tokens}

    return loss_fn
