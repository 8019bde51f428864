"""Per-sequence log-probabilities of packed (or padded) rows of group documents.

A row holds documents (``doc_ids`` 1, 2, ...; 0 is padding) and a document holds branches
(``branch_ids`` 1, 2, ...; 0 is a shared prompt), see :mod:`tscale.data.groups`. The label at
position ``t`` (pre-shifted: the target of the prediction at ``t``) belongs to the sequence
``(row, doc_ids[t], branch_ids[t])``; :func:`sequence_logps` sums each sequence's token
log-probabilities into a dense ``[B, D, NB]`` table, with static bounds so that the step needs no
host sync and no data-dependent shape. :func:`pair_view` flattens it into the chosen/rejected
vectors the preference losses (:mod:`tscale.losses.preference`) take.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import attrs
import torch

from tscale.errors import ShapeError
from tscale.losses.lm import IGNORE_INDEX, target_labels

DEFAULT_NUM_BRANCHES = 3
"""Branch slots when not given: DPO needs 2 (chosen, rejected), KTO 3 (its mismatched "KL"
completion is branch 3)."""


@attrs.frozen
class SequenceLogps:
    """Summed log-probs and token counts of every sequence ``(row, document, branch)``.

    ``sums[b, d, k]`` is the sum of ``log p(label)`` over the trained tokens of document ``d + 1``,
    branch ``k + 1`` of row ``b`` (float32, or float64 for float64 logits), and ``counts[b, d, k]``
    (int64) how many there are; both 0 for a sequence that does not exist.
    """

    sums: torch.Tensor
    counts: torch.Tensor


def batch_field(batch: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """``batch[name]`` [B|1, S] as the logits see it: at ``logits_index`` [B, M] when the batch
    has one (:func:`tscale.data.loader.with_logits_index`), else whole; None when absent."""
    values = batch.get(name, None)
    index = batch.get("logits_index", None)
    if values is None or index is None:
        return values
    return values.expand(index.shape[0], -1).gather(1, index)


def token_logps(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``log p(label)`` of every trained token, 0 elsewhere: ``[B, S|M]``, lined up with the
    labels the logits predict (:func:`tscale.losses.lm.target_labels`); float32, or float64
    for float64 logits (bf16/fp16 logits are read in float32).

    Raises:
        ShapeError: logits and labels (or ``logits_index``) disagree in shape.
    """
    labels = target_labels(batch)
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ShapeError(
            f"sequence_logps: logits have shape {tuple(logits.shape)} but the labels they "
            f"predict have {tuple(labels.shape)}; pass [B, S|M, V] logits of this batch"
        )
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    trained = labels != IGNORE_INDEX
    target = torch.where(trained, labels, 0)
    token = x.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return torch.where(trained, token, 0.0)


def sequence_sums(
    token_values: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    max_docs: int | None = None,
    num_branches: int = DEFAULT_NUM_BRANCHES,
) -> SequenceLogps:
    """Sum per-token values per ``(row, doc, branch)`` sequence into ``[B, D, NB]`` tables.

    The one scatter behind :func:`sequence_logps`, for any per-token value lined up with the
    labels the logits predict (``[B, S]``, or ``[B, M]`` at ``batch["logits_index"]``): the
    policy's token log-probs, or a reference model's precomputed ones read from the batch
    (:func:`batch_field`). Only trained tokens (label != -100) of a real document (doc > 0) and
    branch (branch > 0) count; the sums keep ``token_values``' dtype.

    Args:
        token_values: ``[B, S|M]`` floating values.
        batch: ``labels``, optional ``doc_ids``/``branch_ids``/``logits_index`` (see
            :func:`sequence_logps`).
        max_docs, num_branches: the static bounds D and NB (see :func:`sequence_logps`).

    Raises:
        ShapeError: the values and the labels disagree in shape, or a bound < 1.
    """
    labels = target_labels(batch)
    if token_values.shape != labels.shape:
        raise ShapeError(
            f"sequence_sums: per-token values have shape {tuple(token_values.shape)} but the "
            f"labels have {tuple(labels.shape)}"
        )
    d = batch["labels"].shape[1] if max_docs is None else max_docs
    nb = num_branches
    if d < 1 or nb < 1:
        raise ShapeError(f"sequence_logps: max_docs ({d}) and num_branches ({nb}) must be >= 1")
    trained = labels != IGNORE_INDEX
    docs = batch_field(batch, "doc_ids")
    branches = batch_field(batch, "branch_ids")
    doc = torch.ones_like(labels) if docs is None else docs.expand_as(labels)
    branch = torch.ones_like(labels) if branches is None else branches.expand_as(labels)
    keep = trained & (doc > 0) & (branch > 0)
    torch._assert_async(
        ~(keep & ((doc > d) | (branch > nb))).any(),
        "sequence_logps: a trained token's doc id exceeds max_docs or its branch id exceeds "
        "num_branches",
    )
    slot = (doc - 1).clamp(0, d - 1) * nb + (branch - 1).clamp(0, nb - 1)
    b = labels.shape[0]
    sums = token_values.new_zeros(b, d * nb).scatter_add(
        1, slot, torch.where(keep, token_values, 0.0)
    )
    counts = torch.zeros(b, d * nb, dtype=torch.int64, device=labels.device)
    counts = counts.scatter_add(1, slot, keep.long())
    return SequenceLogps(sums.view(b, d, nb), counts.view(b, d, nb))


def sequence_logps(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    max_docs: int | None = None,
    num_branches: int = DEFAULT_NUM_BRANCHES,
) -> SequenceLogps:
    """Sum token log-probs per ``(row, doc, branch)`` sequence into ``[B, D, NB]`` tables:
    :func:`sequence_sums` of :func:`token_logps`.

    Args:
        logits: ``[B, S, V]`` at every position, or ``[B, M, V]`` at ``batch["logits_index"]``
            when the batch has one (:func:`tscale.data.loader.with_logits_index`; the model then
            computes logits only there). bf16/fp16 logits are read in float32.
        batch: ``labels`` [B, S] (pre-shifted, -100 = not trained); optional ``doc_ids`` and
            ``branch_ids`` [B|1, S] (absent: the whole row is document 1, branch 1, as for
            plain prompt/completion rows); optional ``logits_index`` [B, M].
        max_docs: D, the document slots per row. Default: ``S``, the sequence length of
            ``labels``, which always suffices (documents have at least one token each, so a
            row holds at most S of them); a task that knows a tighter bound (e.g. its shortest
            possible group document) may pass it to shrink the tables.
        num_branches: NB, the branch slots per document (default 3: DPO uses branches 1-2,
            KTO 1-3).

    Returns:
        :class:`SequenceLogps` with ``sums`` and ``counts`` of shape ``[B, D, NB]``. Trained
        tokens of branch 0 (a shared prompt trains nothing) or of padding (doc 0) are not
        counted. A trained token whose doc id exceeds D or branch id exceeds NB is an error,
        checked on the device without a host sync (``torch._assert_async``).

    Raises:
        ShapeError: logits and labels (or ``logits_index``) disagree in shape, or a bound < 1.
    """
    return sequence_sums(
        token_logps(logits, batch), batch, max_docs=max_docs, num_branches=num_branches
    )


class PairView(NamedTuple):
    """Chosen (branch 1) and rejected (branch 2) sequences of every ``(row, doc)`` slot, ``[N]``
    with ``N = B * D``; ``valid`` marks the slots where both exist (others hold zeros)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    valid: torch.Tensor


def pair_view(seq: SequenceLogps) -> PairView:
    """Flatten ``(row, doc)`` into ``N = B * D`` pairs: branch 1 = chosen, branch 2 = rejected.

    Returns:
        :class:`PairView` ``(chosen, rejected, chosen_tokens, rejected_tokens, valid)``, each
        ``[N]``; ``valid`` is True where both completions have trained tokens. Invalid slots hold
        zeros: weight per-pair losses by ``valid`` (and count ``valid.sum()`` pairs) rather than
        index with it, which would make the shape depend on the data.

    Raises:
        ShapeError: the tables have fewer than 2 branch slots.
    """
    if seq.sums.dim() != 3 or seq.sums.shape[2] < 2:
        raise ShapeError(
            f"pair_view: needs [B, D, NB >= 2] tables, got {tuple(seq.sums.shape)}; "
            "compute sequence_logps with num_branches >= 2"
        )
    sums, counts = seq.sums.flatten(0, 1), seq.counts.flatten(0, 1)
    valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
    return PairView(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1], valid)
