"""Keyed token sampling: every draw is a pure function of (completion key, position, logits).

A completion's key is ``fold_in(fold_in(key, prompt), sample)`` and the key of its token at
position t is ``fold_in(completion_key, t)``; the token is drawn by inversion: the first
token whose float64 cumulative probability exceeds ``u × total``, ``u`` one uniform in the open
interval (0, 1) from that key (one uniform per token, not one per vocabulary entry as the
Gumbel-max trick would need). No generator state is shared between rows, so a row's tokens do
not depend on which other rows are in the batch or in what order.

The log-prob recorded for a sampled token is the one of the policy π: the FULL softmax of
``logits / T`` in float32, not the top-k/top-p truncated distribution the token was drawn from
(issue 15, item 4). The training forward computes the same quantity with :func:`token_logps`.
"""

from __future__ import annotations

import torch

from tscale.core import rng as R
from tscale.models.generate import filter_logits


def prompt_keys(key: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """One key per prompt, [num_prompts, 2]: row i is ``fold_in(key, i)``.

    Pass a slice of these to :func:`~tscale.rl.rollout.sample_completions` to sample a subset of
    the prompts with the keys they have in the whole batch.
    """
    idx = torch.arange(num_prompts, dtype=torch.int64, device=key.device)
    return R.fold_in_rows(key.expand(num_prompts, 2), idx)


def completion_keys(keys: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Keys of the completions, prompt-major: row ``p * G + g`` is ``fold_in(keys[p], g)``.

    Args:
        keys: one key per prompt, [N, 2].
        num_samples: G, completions per prompt.

    Returns:
        [N * G, 2] int64 keys.
    """
    n = keys.shape[0]
    per_row = keys.repeat_interleave(num_samples, dim=0)
    sample = torch.arange(num_samples, dtype=torch.int64, device=keys.device).repeat(n)
    return R.fold_in_rows(per_row, sample)


def scaled_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in float32 (at least; float64 stays float64); T = 0 (greedy) scales by 1."""
    scores = logits if logits.dtype == torch.float64 else logits.float()
    return scores / temperature if temperature > 0.0 else scores


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of ``tokens`` under the full softmax of ``logits / T`` (float32 at least).

    Args:
        logits: [..., V].
        tokens: [...] int64 (any value where the result is not used, e.g. a clamped -100).
        temperature: the sampling temperature T (0, greedy, counts as 1).

    Returns:
        [...] log-probs.
    """
    logp = scaled_scores(logits, temperature).log_softmax(dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and record its log-prob under π.

    Args:
        logits: [B, V] logits of the next token.
        keys: [B, 2] one key per row (already folded with the position).
        temperature: T > 0 samples ``softmax(filtered(logits / T))``; 0 is greedy (argmax).
        top_k: draw among the k best only (ties kept), as :func:`~tscale.models.filter_logits`.
        top_p: draw from the nucleus of mass ``top_p`` only.

    Returns:
        ``(tokens [B] int64, logps [B] float32)``; ``logps`` are the full-softmax ones of
        :func:`token_logps`, whatever ``top_k``/``top_p`` removed.
    """
    scores = scaled_scores(logits, temperature)
    if temperature == 0.0:
        tokens = scores.argmax(dim=-1)
    else:
        tokens = _invert(filter_logits(scores, top_k=top_k, top_p=top_p), keys)
    logps = scores.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logps.float()


def _invert(kept: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws [B] from ``softmax(kept)`` [B, V], one keyed uniform per row.

    A filtered token (-inf) has probability 0, so the CDF is flat there and ``searchsorted``
    (the first index whose CDF exceeds the target) never lands on it; a target that rounds up
    to the total falls back to the last token of non-zero probability.
    """
    probs = kept.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = R.uniform_rows(keys, 1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(tokens, last)
