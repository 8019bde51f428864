"""Rollouts: G completions per prompt from the current policy, with the KV cache, batched.

The prompts share one left-padded batch (as :func:`tscale.models.generate`): pads are document 0
and are never attended to, positions count from each prompt's first real token. The prompts are
prefilled once and the cache is repeated G times (a prompt's G rows share its prefill), then one
token per step is decoded for the N × G rows (prompt-major: row ``p * G + g``) that are still
running: once fewer than :data:`COMPACT_BELOW` of the decoded rows are, the finished ones leave
the batch and the cache. A row ends at its first stop id (kept as its last token) or after
``max_new_tokens`` (then it is truncated).

Randomness comes from :mod:`tscale.rl.sampling`'s counter-based keys per (prompt, sample,
position), so a rollout is a pure function of (params, prompts, key): the same key gives the
same completions, and a prompt sampled with its key from :func:`~tscale.rl.sampling.prompt_keys`
gets the same completions alone or inside a batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from tensordict import TensorDictBase

from tscale.core import rng as R
from tscale.errors import ShapeError
from tscale.models.generate import CachedModel
from tscale.models.protocol import frozen_kw
from tscale.rl.sampling import completion_keys, prompt_keys, sample_tokens

__all__ = ["Rollout", "sample_completions"]


@attrs.frozen(kw_only=True, eq=False)
class Rollout:
    """G completions of each of N prompts, as sampled (all tensors without a graph).

    Rows are prompt-major: completion row ``r`` belongs to prompt ``group[r] = r // G`` and is
    its sample ``r % G``.

    Attributes:
        prompt_ids: the N prompts' token ids.
        completion_ids: [N*G, M] int64, right-padded with ``pad_id`` after each row's end.
        lengths: [N*G] int64, tokens of each completion (its stop id included).
        sampler_logps: [N*G, M] float32, log π of each sampled token under the full softmax of
            ``logits / temperature`` as the sampler computed it; 0 after each row's end.
        truncated: [N*G] bool, the row reached ``max_new_tokens`` without a stop id.
        group: [N*G] int64, the prompt index (0..N-1) of each row.
        num_samples: G.
        temperature: the sampling temperature (0: greedy; log-probs then at T = 1).
        pad_id: the padding id of ``completion_ids``.
        generation_seconds: wall-clock time of the sampling (a timing, not part of the result).
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    lengths: torch.Tensor
    sampler_logps: torch.Tensor
    truncated: torch.Tensor
    group: torch.Tensor
    num_samples: int
    temperature: float
    pad_id: int
    generation_seconds: float

    @property
    def num_completions(self) -> int:
        """N × G."""
        return int(self.completion_ids.shape[0])

    def completions(self) -> list[list[int]]:
        """Each completion's token ids without padding (host sync)."""
        rows = self.completion_ids.tolist()
        return [row[:n] for row, n in zip(rows, self.lengths.tolist(), strict=True)]

    def completion_mask(self) -> torch.Tensor:
        """[N*G, M] bool, True at the sampled tokens."""
        m = self.completion_ids.shape[1]
        col = torch.arange(m, device=self.lengths.device)
        return col[None] < self.lengths[:, None]


def _check(
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    key: torch.Tensor,
) -> None:
    if num_samples < 1:
        raise ShapeError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ShapeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ShapeError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ShapeError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ShapeError(f"top_p must be in (0, 1] or None, got {top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ShapeError(f"prompt {i} is empty; sampling needs a token to start from")
    if key.dtype != torch.int64 or key.shape not in ((2,), (len(prompts), 2)):
        raise ShapeError(
            f"key must be an int64 key [2] or one key per prompt [{len(prompts)}, 2] "
            f"(tscale.core.rng), got {key.dtype} {tuple(key.shape)}"
        )


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [N, W] left-padded, and each row's pad count [N]."""
    width = max(len(p) for p in prompts)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    ids = torch.tensor(rows, dtype=torch.int64, device=device)
    pads = torch.tensor([width - len(p) for p in prompts], dtype=torch.int64, device=device)
    return ids, pads


def _cache_row_dims(model: CachedModel, cache: Any, device: torch.device) -> dict | None:
    """The row dim of every leaf of ``cache``, or None when its layout is unknown. A leaf's row
    dim is found by comparing empty caches of 1 and 2 rows, so any model's cache works without
    knowing its layout."""
    if not isinstance(cache, TensorDictBase):
        return None
    one, two = model.init_cache(1, 1, device=device), model.init_cache(2, 1, device=device)
    dims: dict[Any, int] = {}
    for name, _ in cache.items(True, True):
        differ = [
            d
            for d, (a, b) in enumerate(zip(one[name].shape, two[name].shape, strict=True))
            if a != b
        ]
        if len(differ) != 1:
            return None
        dims[name] = differ[0]
    return dims


def _repeat_cache(model: CachedModel, cache: Any, times: int, device: torch.device) -> Any:
    """The cache with each row repeated ``times`` times (rows stay grouped), or None when its
    layout is unknown (:func:`_cache_row_dims`)."""
    if times == 1:
        return cache
    dims = _cache_row_dims(model, cache, device)
    if dims is None:
        return None
    return cache.apply(
        lambda name, t: t.repeat_interleave(times, dim=dims[name]), named=True, nested_keys=True
    )


def _select_rows(cache: TensorDictBase, dims: Mapping[Any, int], rows: torch.Tensor) -> Any:
    """The cache of the rows ``rows`` only (their order kept)."""
    return cache.apply(
        lambda name, t: t.index_select(dims[name], rows), named=True, nested_keys=True
    )


COMPACT_BELOW = 0.75
"""Decoding drops the finished rows from its batch (and their cache) once fewer than this
fraction of the rows it decodes are still running."""


def _first_logits(
    model: CachedModel,
    params: TensorDictBase,
    ids: torch.Tensor,
    pads: torch.Tensor,
    num_samples: int,
    slots: int,
    frozen: Mapping[str, Any] | None,
) -> tuple[torch.Tensor, Any]:
    """Prefill: last-position logits [N*G, V] and the cache of N*G rows."""
    dev = ids.device
    col = torch.arange(ids.shape[1], device=dev)[None]
    batch = {
        "input_ids": ids,
        "position_ids": (col - pads[:, None]).clamp_min(0),
        "doc_ids": (col >= pads[:, None]).to(torch.int64),
    }
    cache = model.init_cache(ids.shape[0], slots, device=dev)
    logits, cache = model.apply_with_cache(params, batch, cache, 0, **frozen_kw(frozen))
    repeated = _repeat_cache(model, cache, num_samples, dev)
    if repeated is not None:
        return logits[:, -1].repeat_interleave(num_samples, dim=0), repeated
    # Unknown cache layout: prefill every row instead.
    rep = {k: v.repeat_interleave(num_samples, dim=0) for k, v in batch.items()}
    cache = model.init_cache(rep["input_ids"].shape[0], slots, device=dev)
    logits, cache = model.apply_with_cache(params, rep, cache, 0, **frozen_kw(frozen))
    return logits[:, -1], cache


def sample_completions(
    model: CachedModel,
    params: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    key: torch.Tensor,
    max_new_tokens: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    frozen: Mapping[str, Any] | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions of every prompt with the KV cache, under no_grad.

    Args:
        model: a model with ``init_cache``/``apply_with_cache`` (any
            :class:`~tscale.models.protocol.LanguageModel`: a ``Transformer``, a loaded
            ``Model``, a ``LoraModel`` decoding with unmerged adapters …).
        params: its (trainable) params.
        prompts: N non-empty prompts' token ids.
        num_samples: G, completions per prompt.
        key: a :mod:`tscale.core.rng` key [2] (prompt i then gets ``fold_in(key, i)``) or one
            key per prompt [N, 2] (e.g. rows of :func:`~tscale.rl.sampling.prompt_keys`). Fold
            the step in first (``fold_in(state.rng, step)``) for a fresh rollout per step.
        max_new_tokens: most tokens per completion.
        pad_id: the id placed in padding (never attended to).
        temperature: T > 0 samples ``softmax(logits / T)`` (restricted by top-k/top-p); 0 is
            greedy.
        top_k: draw among the k most likely tokens only.
        top_p: draw from the nucleus of mass ``top_p`` only.
        stop_ids: a completion ends at the first of these (EOS, end-of-turn), which it keeps.
        device: where to run; default the device of the first parameter.
        frozen: the train state's frozen trees (e.g. the LoRA base), handed to every call.

    Returns:
        A :class:`Rollout`. Its ``sampler_logps`` are log π(token) under the full softmax of
        ``logits / T`` in float32, whatever top-k/top-p restricted the draw to.

    Raises:
        ShapeError: an empty prompt, a count or sampling setting out of range, or a key of the
            wrong shape (no prompts at all gives an empty rollout).
    """
    _check(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, key)
    start = time.perf_counter()
    if device is None:
        device = next(iter(params.values(True, True))).device
    dev = torch.device(device)
    n, g = len(prompts), num_samples
    keys = key.to(dev) if key.dim() == 2 else prompt_keys(key.to(dev), n)
    row_keys = completion_keys(keys, g)
    stops = torch.as_tensor(list(stop_ids), dtype=torch.int64, device=dev)
    tokens = torch.full((n * g, max_new_tokens), pad_id, dtype=torch.int64, device=dev)
    logps = torch.zeros((n * g, max_new_tokens), dtype=torch.float32, device=dev)
    lengths = torch.zeros(n * g, dtype=torch.int64, device=dev)
    done = torch.zeros(n * g, dtype=torch.bool, device=dev)

    dims = None
    with torch.no_grad():
        if n:
            ids, prompt_pads = _left_pad(prompts, pad_id, dev)
            width = ids.shape[1]
            pads = prompt_pads.repeat_interleave(g)
            logits, cache = _first_logits(
                model, params, ids, prompt_pads, g, width + max_new_tokens, frozen
            )
            dims = _cache_row_dims(model, cache, dev)
        # the rows being decoded (all at first; the finished ones are dropped now and then:
        # a row's draws depend on its key and logits only, not on the other rows)
        live = torch.arange(n * g, device=dev)
        live_keys, live_done = row_keys, done
        for t in range(max_new_tokens if n else 0):
            nxt, lp = sample_tokens(
                logits,
                R.fold_in_rows(live_keys, t),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
            nxt = torch.where(live_done, pad_id, nxt)
            tokens[live, t] = nxt
            logps[live, t] = torch.where(live_done, 0.0, lp)
            lengths[live] += (~live_done).to(torch.int64)
            if stops.numel():
                live_done = live_done | torch.isin(nxt, stops)
                done[live] = live_done
            running = int((~live_done).sum())
            if t == max_new_tokens - 1 or running == 0:
                break
            if dims is not None and running < COMPACT_BELOW * live.numel():
                keep = (~live_done).nonzero()[:, 0]
                live, live_keys, live_done = live[keep], live_keys[keep], live_done[keep]
                nxt, cache = nxt[keep], _select_rows(cache, dims, keep)
            batch = {
                "input_ids": nxt[:, None],
                "position_ids": (width - pads[live] + t)[:, None],
                "doc_ids": torch.ones_like(nxt)[:, None],
            }
            step_logits, cache = model.apply_with_cache(
                params, batch, cache, width + t, **frozen_kw(frozen)
            )
            logits = step_logits[:, -1]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return Rollout(
        prompt_ids=[list(p) for p in prompts],
        completion_ids=tokens,
        lengths=lengths,
        sampler_logps=logps,
        truncated=~done,
        group=torch.arange(n, device=dev).repeat_interleave(g),
        num_samples=g,
        temperature=float(temperature),
        pad_id=pad_id,
        generation_seconds=time.perf_counter() - start,
    )
