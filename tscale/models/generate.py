"""Batched decoding (greedy or sampled) over pure model functions, with a KV cache when offered.

Prompts of different lengths share one left-padded batch. Padding is hidden from the model through
its own batch fields: pad tokens get ``doc_ids`` 0 and real tokens ``doc_ids`` 1 (so no real token
attends to a pad), and ``position_ids`` count from 0 at each prompt's first real token; a row then
decodes exactly as it would alone.

A model that offers ``init_cache(batch_size, max_length, device=...)`` and
``apply_with_cache(params, batch, cache, offset) -> (logits, cache)`` (any model of
:mod:`tscale.models.protocol`: a :class:`~tscale.models.transformer.Transformer`, a loaded
:class:`~tscale.models.hf.Model`, a ``LoraModel`` — decoding with unmerged adapters — …) is
decoded incrementally: one prefill over the prompts, then one token per step against the cache. A
plain ``apply(params, batch) -> logits`` function is decoded by re-running it over the whole
sequence each step (O(steps x length) work; the reference the cache is tested against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDictBase

from tscale.core import rng as R
from tscale.errors import ShapeError
from tscale.models.protocol import frozen_kw

ApplyFn = Callable[[TensorDictBase, Mapping[str, torch.Tensor]], torch.Tensor]


@runtime_checkable
class CachedModel(Protocol):
    """What :func:`generate` needs for incremental decoding (``Transformer`` and ``Model`` are)."""

    def apply(self, params: TensorDictBase, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, S, V] without a cache."""
        ...

    def init_cache(self, batch_size: int, max_length: int, *, device: Any = ...) -> Any:
        """An empty cache."""
        ...

    def apply_with_cache(
        self, params: TensorDictBase, batch: Mapping[str, torch.Tensor], cache: Any, offset: int
    ) -> tuple[torch.Tensor, Any]:
        """Logits of new tokens against the cache, and the cache."""
        ...


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the prompts; returns ``input_ids`` [B, L] and the pad counts [B]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64, device=device)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.int64, device=device)
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


def filter_logits(
    logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k set and the nucleus set to -inf.

    As ``transformers``' warpers: top-k keeps every token scoring at least the k-th best (ties
    kept); top-p (Holtzman et al., "The Curious Case of Neural Text Degeneration", 2020) keeps
    the most probable tokens until their mass reaches ``top_p``, and always the best one. Top-k
    applies first.
    """
    out = logits
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p  # ascending: the tail whose mass stays below 1 - p
        drop_sorted[..., -1] = False  # keep at least the most probable token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token [B] from last-position logits [B, V]: argmax, or a filtered sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    key: torch.Tensor | None,
) -> None:
    if max_new_tokens < 0:
        raise ShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ShapeError(f"prompt {i} is empty; generation needs a token to start from")
    if not temperature >= 0.0:
        raise ShapeError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ShapeError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ShapeError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature > 0.0 and key is None:
        raise ShapeError("sampling (temperature > 0) needs a key from tscale.core.rng")


def _cached_model(model: CachedModel | ApplyFn, use_cache: bool) -> CachedModel | None:
    """The object offering a cache: ``model`` itself, or the owner of a bound ``.apply``."""
    if not use_cache:
        return None
    if isinstance(model, CachedModel):
        return model if _offers_cache(model) else None
    owner = getattr(model, "__self__", None)
    if getattr(model, "__name__", None) == "apply" and isinstance(owner, CachedModel):
        return owner if _offers_cache(owner) else None
    return None


def _offers_cache(model: Any) -> bool:
    """A wrapper whose methods exist but whose inner model has no cache (a ``LoraModel`` built
    from a bare ``apply_fn``) says so with ``offers_cache = False``."""
    return bool(getattr(model, "offers_cache", True))


def generate(
    model: CachedModel | ApplyFn,
    params: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    key: torch.Tensor | None = None,
    use_cache: bool = True,
    device: torch.device | str | None = None,
    frozen: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Continue each prompt, all prompts in one left-padded batch.

    Args:
        model: a model with ``apply_with_cache``/``init_cache`` (decoded with a KV cache), its
            bound ``.apply`` (the same), or any ``apply(params, batch) -> logits`` function
            honouring ``position_ids`` and ``doc_ids`` (decoded without a cache).
        params: the model parameters.
        prompts: token ids of each prompt (each non-empty).
        max_new_tokens: most tokens to generate per prompt.
        pad_id: the token id placed in padding (never attended to).
        temperature: 0 is greedy (argmax); above 0 samples from ``softmax(logits / T)``.
        top_k: sample among the k most likely tokens only.
        top_p: sample from the nucleus of mass ``top_p`` only.
        stop_tokens: a row ends at the first of these (which is not returned).
        key: a :mod:`tscale.core.rng` key; required when sampling. The same key gives the same
            tokens.
        use_cache: False forces the no-cache path even for a model that has a cache.
        device: where to run; default the device of the first parameter.
        frozen: the train state's frozen trees (e.g. the LoRA base), handed to every call.

    Returns:
        The new tokens of each prompt, in order, excluding the stop token.

    Raises:
        ShapeError: an empty prompt, a negative ``max_new_tokens``, a bad sampling setting, or
            sampling without a key.
    """
    _check(prompts, max_new_tokens, temperature, top_k, top_p, key)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    if device is None:
        device = next(iter(params.values(True, True))).device
    dev = torch.device(device)
    generator = R.generator(key, device=dev) if temperature > 0.0 and key is not None else None
    cached = _cached_model(model, use_cache)
    apply_fn: ApplyFn = model.apply if isinstance(model, CachedModel) else model
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.int64, device=dev)

    with torch.no_grad():
        ids, pads = _left_pad(prompts, pad_id, dev)
        b, width = ids.shape
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        new: list[torch.Tensor] = []
        cache = None
        if cached is not None:
            cache = cached.init_cache(b, width + max_new_tokens, device=dev)
            logits, cache = cached.apply_with_cache(
                params, _batch_for(ids, pads), cache, 0, **frozen_kw(frozen)
            )
        else:
            logits = apply_fn(params, _batch_for(ids, pads), **frozen_kw(frozen))
        for step in range(max_new_tokens):
            nxt = _next_token(logits[:, -1], temperature, top_k, top_p, generator)
            # Finished rows ride along until all are done; their tokens are cut at the stop below.
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new.append(nxt)
            if stops.numel():
                done = done | torch.isin(nxt, stops)
                if bool(done.all()):
                    break
            if step == max_new_tokens - 1:
                break
            if cached is not None:
                batch = {
                    "input_ids": nxt[:, None],
                    "position_ids": (width - pads + step)[:, None],
                    "doc_ids": torch.ones_like(nxt)[:, None],
                }
                logits, cache = cached.apply_with_cache(
                    params, batch, cache, width + step, **frozen_kw(frozen)
                )
            else:
                ids = torch.cat((ids, nxt[:, None]), dim=1)
                logits = apply_fn(params, _batch_for(ids, pads), **frozen_kw(frozen))
        out = torch.stack(new, dim=1).tolist()

    stop_set = set(stop_tokens)
    result: list[list[int]] = []
    for row in out:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
    return result


def greedy(
    apply_fn: CachedModel | ApplyFn,
    params: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    device: torch.device | str | None = None,
    frozen: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Greedy (argmax) continuation of each prompt: :func:`generate` with ``temperature=0``.

    Args:
        apply_fn: ``apply(params, batch) -> logits`` (e.g. ``Transformer(config).apply``; a
            bound ``.apply`` of a model with a KV cache decodes with the cache).
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
    return generate(
        apply_fn,
        params,
        prompts,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        stop_tokens=() if eos_id is None else (eos_id,),
        device=device,
        frozen=frozen,
    )
