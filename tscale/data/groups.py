"""A group (one prompt, several completions) as one document with a shared-prompt layout.

A *group* is a prompt and n completions that share it (a DPO pair: branch 1 = chosen, branch 2 =
rejected; KTO: branch 1 or 2 plus branch 3, the mismatched "KL" completion). :func:`group_document`
lays it out as one document of per-token fields ``input_ids``, ``labels``, ``position_ids`` and
``branch_ids``. With ``share_prompt`` the prompt is stored once (P = its length)::

    prompt[0 .. P-2]                 branch 0, positions 0 .. P-2, labels -100
    prompt[P-1], completion 1        branch b1, positions P-1, P, P+1, ...
    prompt[P-1], completion 2        branch b2, positions P-1, P, P+1, ...  (a copy, restarting)
    ...

Labels are pre-shifted (``labels[t]`` is the target of the prediction at ``t``): each branch's
copy of the last prompt token predicts the branch's first completion token, each completion token
the next one, and the branch's last token nothing (-100). Without ``share_prompt`` each branch is
the whole prompt plus its completion, with its branch id everywhere and positions from 0, labelled
as SFT labels a prompt/completion pair.

The model's attention rule (:func:`tscale.models.transformer.hidden_states`): token ``i`` attends
to ``j`` iff ``doc_ids[i] == doc_ids[j]``, ``j <= i`` and ``branch_ids[j]`` is 0 or
``branch_ids[i]``. So every token of branch b computes exactly what it computes in the unpacked
sequence ``prompt + completion_b`` (the prompt's last token, which would otherwise be shared, is
copied per branch because its label differs). Rows of such documents come from
:func:`tscale.data.pack.pack_examples` / :class:`~tscale.data.pack.StreamingPacker` (several
documents, doc ids 1, 2, ...) or :func:`single_document_row` (one per row, doc ids all 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tscale.data.tokenize import IGNORE_INDEX
from tscale.errors import DataError

GROUP_FIELDS = ("input_ids", "labels", "position_ids", "branch_ids")
"""The per-token fields of a group document, all one length."""


def _token_list(values: Any, what: str) -> list[int]:
    """``values`` as a non-empty list of ints >= 0, or a one-line error naming ``what``."""
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"group_document: {what} must be a list of token ids") from None
    if not out:
        raise DataError(
            f"group_document: {what} is empty; every prompt and completion needs a token"
        )
    if any(isinstance(v, bool) for v in values) or min(out) < 0:
        raise DataError(f"group_document: {what} holds a token id that is not an int >= 0")
    return out


def _check_branches(branches: Sequence[int], n: int) -> list[int]:
    try:
        out = [int(b) for b in branches]
    except (TypeError, ValueError):
        raise DataError(f"group_document: branches must be ints >= 1, got {branches!r}") from None
    if len(out) != n:
        raise DataError(
            f"group_document: {n} completions but {len(out)} branch ids; give one per completion"
        )
    if any(isinstance(b, bool) for b in branches) or any(b < 1 for b in out):
        raise DataError(
            f"group_document: branch ids must be ints >= 1 (0 marks the shared prompt), got {out}"
        )
    if len(set(out)) != len(out):
        raise DataError(f"group_document: branch ids must be distinct, got {out}")
    return out


def group_document(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    branches: Sequence[int],
    *,
    share_prompt: bool,
) -> dict[str, list[int]]:
    """One group as one document: ``{input_ids, labels, position_ids, branch_ids}``.

    Args:
        prompt_ids: the prompt's token ids (tokenized on its own; non-empty).
        completions: each completion's token ids (non-empty), in branch order.
        branches: the branch id of each completion: distinct ints >= 1 (1 = chosen, 2 =
            rejected, 3 = KTO's mismatched completion, ...).
        share_prompt: store the prompt once, completions after it (see the module docstring);
            else one whole prompt + completion per branch.

    Returns:
        The document's per-token fields as int lists of one length: with ``share_prompt``
        ``P - 1 + sum(len(c) + 1)``, else ``sum(P + len(c))`` tokens.

    Raises:
        DataError: an empty prompt or completion, no completions, a token id that is not an
            int >= 0, or branch ids that are not distinct ints >= 1, one per completion.
    """
    prompt = _token_list(prompt_ids, "prompt_ids")
    if isinstance(completions, (str, bytes)) or not len(completions):
        raise DataError("group_document: completions is empty; a group needs at least one")
    comps = [_token_list(c, f"completion {i}") for i, c in enumerate(completions)]
    ids = _check_branches(branches, len(comps))
    p = len(prompt)
    out: dict[str, list[int]] = {name: [] for name in GROUP_FIELDS}

    def add(tokens: list[int], labels: list[int], start: int, branch: int) -> None:
        out["input_ids"] += tokens
        out["labels"] += labels
        out["position_ids"] += range(start, start + len(tokens))
        out["branch_ids"] += [branch] * len(tokens)

    if share_prompt:
        add(prompt[:-1], [IGNORE_INDEX] * (p - 1), 0, 0)
        for comp, branch in zip(comps, ids, strict=True):
            add([prompt[-1], *comp], [*comp, IGNORE_INDEX], p - 1, branch)
    else:
        for comp, branch in zip(comps, ids, strict=True):
            add([*prompt, *comp], [IGNORE_INDEX] * (p - 1) + [*comp, IGNORE_INDEX], 0, branch)
    return out


def single_document_row(document: dict[str, list[int]]) -> dict[str, list[int]]:
    """``document`` as a row of its own (no packing): the same fields plus ``doc_ids`` all 1."""
    return {**document, "doc_ids": [1] * len(document["input_ids"])}
