"""The log-prob contract (issue 15, item 4): the training forward reproduces the sampler's π.

The sampler (:func:`~tscale.rl.rollout.sample_completions`, KV cache, left-padded prompts)
records log π of every token it sampled; the training forward (the model's plain ``apply`` over
prompt + completion rows) recomputes log π at the same tokens with
:func:`~tscale.rl.sampling.token_logps`. The two must agree: :func:`logprob_mismatch` measures
by how much, as max |exp(Δ) − 1| over the completion tokens (a metric every step, ≤ 1e-5 in
float32 in the tests).

Why against the recorded values and not against a recomputation: the tokens were drawn from
the sampler's distribution, so the importance ratio of the first update must be
π_train / π_sampler. A loss that takes its "old" log-probs from a second training-style forward
(or from ``new.detach()``) has a ratio of exactly 1 by construction, whatever the two
distributions are, and so hides every way the sampler can differ from the trained model — a
temperature applied in one pass only, log-probs of the top-k/top-p truncated distribution, a
padding or position offset in the cache path, another dtype or kernel — while the gradient is
silently off-policy. Only the sampler's own numbers expose the difference.
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict import TensorDict

from tscale.errors import ShapeError
from tscale.rl.rollout import Rollout
from tscale.rl.sampling import token_logps

__all__ = ["completion_logps", "logprob_mismatch", "rollout_batch"]

IGNORE = -100


def rollout_batch(rollout: Rollout, *, layout: Literal["left", "right"] = "right") -> TensorDict:
    """Training rows for a rollout: each completion after its prompt, one row per completion.

    Args:
        rollout: from :func:`~tscale.rl.rollout.sample_completions`.
        layout: ``"left"``, the sampler's own layout (prompts left-padded to the longest one,
            completions from the same column, right padding after them); ``"right"``, each row
            from column 0 with all padding at the end.

    Returns:
        A TensorDict of batch size [N*G] with ``input_ids``, ``position_ids`` (from 0 at each
        prompt's first token), ``doc_ids`` (1 real, 0 pad), ``labels`` (pre-shifted: the target
        of the prediction at each position, -100 outside the completions), ``sampler_logps``
        (float32, aligned with ``labels``, 0 elsewhere), ``group``, ``truncated``, and, for a
        loss over completion positions ([N*G, M], as :mod:`tscale.losses.rl` takes them),
        ``completion_index`` [N*G, M] (the column of each completion token's label; 0 past the
        end) and ``completion_mask`` [N*G, M]: ``x.gather(1, batch["completion_index"])``
        turns any [N*G, S] per-position tensor into completion positions without a host sync.
    """
    if layout not in ("left", "right"):
        raise ShapeError(f"layout must be 'left' or 'right', got {layout!r}")
    prompts = rollout.prompt_ids
    g = rollout.num_samples
    lengths = rollout.lengths.tolist()
    completions = rollout.completion_ids.tolist()
    width = max((len(p) for p in prompts), default=0)
    if layout == "left":
        starts = [width - len(prompts[r // g]) for r in range(len(lengths))]
        seq = width + rollout.completion_ids.shape[1]
    else:
        starts = [0] * len(lengths)
        seq = max((len(prompts[r // g]) + n for r, n in enumerate(lengths)), default=0)
    rows = len(lengths)
    ids = torch.full((rows, seq), rollout.pad_id, dtype=torch.int64)
    pos = torch.zeros((rows, seq), dtype=torch.int64)
    doc = torch.zeros((rows, seq), dtype=torch.int64)
    labels = torch.full((rows, seq), IGNORE, dtype=torch.int64)
    index = torch.zeros(rollout.completion_ids.shape, dtype=torch.int64)
    for r, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        row = prompts[r // g] + completions[r][:n]
        p = len(prompts[r // g])
        ids[r, start : start + len(row)] = torch.tensor(row)
        pos[r, start : start + len(row)] = torch.arange(len(row))
        doc[r, start : start + len(row)] = 1
        labels[r, start + p - 1 : start + p - 1 + n] = torch.tensor(completions[r][:n])
        index[r, :n] = torch.arange(start + p - 1, start + p - 1 + n)
    sampler = torch.zeros((rows, seq), dtype=torch.float32)
    mask = labels != IGNORE
    recorded = rollout.sampler_logps.cpu()
    sampler[mask] = recorded[rollout.completion_mask().cpu()]
    dev = rollout.completion_ids.device
    return TensorDict(
        {
            "input_ids": ids,
            "position_ids": pos,
            "doc_ids": doc,
            "labels": labels,
            "sampler_logps": sampler,
            "group": rollout.group.cpu(),
            "truncated": rollout.truncated.cpu(),
            "completion_index": index,
            "completion_mask": rollout.completion_mask().cpu(),
        },
        batch_size=[rows],
    ).to(dev)


def completion_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The training forward's log π at the completion tokens: [B, S] float32, 0 elsewhere.

    Args:
        logits: [B, S, V] from the model's ``apply`` over :func:`rollout_batch` rows.
        labels: [B, S] pre-shifted targets, -100 where nothing is scored.
        temperature: the sampling temperature T (the full softmax of ``logits / T``).
    """
    mask = labels != IGNORE
    logps = token_logps(logits, labels.clamp_min(0), temperature)
    return torch.where(mask, logps, 0.0).float()


def logprob_mismatch(
    train_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """max |exp(train − sampler) − 1| over the masked (completion) tokens; 0-d float32.

    This is the largest deviation of the first update's importance ratio from 1 that comes
    from the sampler and the training forward disagreeing, not from the update. Compare with
    the log-probs the sampler recorded, never with a recomputation (see the module docstring:
    a recomputation makes the ratio 1 by construction and hides the bug). No host sync; 0 for
    an empty mask.

    Args:
        train_logps: log π of the training forward, any shape.
        sampler_logps: the sampler's recorded log π, the same shape.
        mask: bool, the same shape, True at the completion tokens.
    """
    if train_logps.shape != sampler_logps.shape or mask.shape != train_logps.shape:
        raise ShapeError(
            f"logprob_mismatch: shapes differ: train {tuple(train_logps.shape)}, sampler "
            f"{tuple(sampler_logps.shape)}, mask {tuple(mask.shape)}"
        )
    delta = train_logps.double() - sampler_logps.double()
    deviation = torch.where(mask, torch.expm1(delta).abs(), 0.0)
    if deviation.numel() == 0:
        return deviation.new_zeros((), dtype=torch.float32)
    return deviation.amax().float()
