"""Greedy decoding over a pure ``apply(params, batch) -> logits`` model, batched with left padding.

There is no KV cache yet: every new token re-runs the model over the whole (padded) sequence, which
costs O(steps x length) forward work. That is fine for evaluation prompts on small models; a KV
cache comes in a later issue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDictBase

from tscale.errors import ShapeError

ApplyFn = Callable[[TensorDictBase, Mapping[str, torch.Tensor]], torch.Tensor]


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the prompts; returns ``input_ids`` [B, L] and the pad counts [B]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64, device=device)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.int64, device=device)
    pads = torch.as_tensor([width - len(p) for p in prompts], dtype=torch.int64, device=device)
    return ids, pads


def _batch_for(ids: torch.Tensor, pads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model batch for left-padded ``ids``: pads are document 0, real tokens document 1."""
    col = torch.arange(ids.shape[1], device=ids.device)[None]
    real = col >= pads[:, None]
    return {
        "input_ids": ids,
        "position_ids": (col - pads[:, None]).clamp_min(0),
        "doc_ids": real.to(torch.int64),
    }


def greedy(
    apply_fn: ApplyFn,
    params: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy (argmax) continuation of each prompt, all prompts in one left-padded batch.

    Padding is hidden from the model through its own batch fields: pad tokens get ``doc_ids`` 0
    and real tokens ``doc_ids`` 1 (so no real token attends to a pad), and ``position_ids`` count
    from 0 at each prompt's first real token. A row then decodes exactly as it would alone. No KV
    cache: each step re-runs ``apply_fn`` on the whole sequence (a KV cache comes later).

    Args:
        apply_fn: ``apply(params, batch) -> logits [B, S, V]`` honouring ``position_ids`` and
            ``doc_ids`` (e.g. ``Transformer(config).apply``).
        params: the model parameters.
        prompts: token ids of each prompt (each non-empty).
        max_new_tokens: most tokens to generate per prompt.
        eos_id: a row stops at this token (which is not returned); None never stops early.
        pad_id: the token id placed in padding (never attended to).
        device: where to run; default the device of the first parameter.

    Returns:
        The new tokens of each prompt, in order, excluding the eos token.

    Raises:
        ShapeError: a prompt is empty or ``max_new_tokens`` is negative.
    """
    if max_new_tokens < 0:
        raise ShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ShapeError(f"prompt {i} is empty; greedy needs at least one token to start from")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    if device is None:
        device = next(iter(params.values(True, True))).device
    dev = torch.device(device)

    with torch.no_grad():
        ids, pads = _left_pad(prompts, pad_id, dev)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = apply_fn(params, _batch_for(ids, pads))
            nxt = logits[:, -1].argmax(dim=-1)
            # Finished rows ride along until all are done; their tokens are cut at eos below.
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new.append(nxt)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
            ids = torch.cat((ids, nxt[:, None]), dim=1)
        out = torch.stack(new, dim=1).tolist()

    result: list[list[int]] = []
    for row in out:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result
