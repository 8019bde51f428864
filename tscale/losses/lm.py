"""Token cross-entropy for language modelling, as a sum plus a token count.

Labels are *pre-shifted*: ``labels[b, t]`` is the target of the prediction at position ``t``
(``ignore_index`` where nothing is trained). Losses return sums; the step divides by the token count
of the whole accumulated (and, under data parallelism, all-rank) batch, so neither gradient
accumulation nor world size changes the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

IGNORE_INDEX = -100

ApplyFn = Callable[[TensorDictBase, Any], torch.Tensor]


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the non-ignored tokens, computed in at least float32.

    Args:
        logits: ``[..., V]`` scores.
        labels: ``[...]`` integer targets, ``ignore_index`` where not trained.

    Returns:
        ``(loss_sum, tokens)``: a 0-d float32 sum (float64 for float64 logits) and the 0-d
        int64 count of trained tokens.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype not in (torch.float32, torch.float64):
        flat_logits = flat_logits.float()  # bf16/fp16 logits: the softmax runs in float32
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    tokens = (flat_labels != ignore_index).sum()
    return loss_sum, tokens


def make_lm_loss(
    apply_fn: ApplyFn, *, ignore_index: int = IGNORE_INDEX
) -> Callable[[TensorDictBase, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]:
    """A loss ``loss_fn(params, batch) -> (loss_sum, {"tokens": n})`` for ``apply_fn``'s logits."""

    def loss_fn(params: TensorDictBase, batch: Mapping[str, torch.Tensor]):
        logits = apply_fn(params, batch)
        loss_sum, tokens = token_cross_entropy(logits, batch["labels"], ignore_index=ignore_index)
        return loss_sum, {"tokens": tokens}

    return loss_fn
