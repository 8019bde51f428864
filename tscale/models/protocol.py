"""The one model protocol: what every model and every model wrapper offers.

A model is a record of pure functions over a params tree (a nested ``TensorDict`` named like
the HF checkpoint). :class:`~tscale.models.transformer.Transformer` implements the protocol; the
wrappers implement it again around another model, so they stack:

- :class:`~tscale.models.lora.LoraModel` (and ``QLoraModel``): the params are the adapters, the
  frozen base comes from ``frozen["base"]`` (or the base the wrapper was built with);
- :class:`~tscale.models.stack.CastModel`: float params cast to a compute dtype for the forward;
- :class:`tscale.parallel.fsdp.ShardedModel` and :class:`tscale.parallel.ddp.OverlappedModel`:
  they pass a ``gather`` hook to every method (all-gather of a layer's shards, or the start of
  its gradient all-reduce in the backward).

:func:`tscale.models.stack.stack_model` builds the stack in its one order (see
``docs/design.md``, "Models and their wrappers").

Two keyword arguments run through every method:

- ``gather`` (:data:`Gather`): how stored params become the params a layer computes with. The
  innermost model calls it once for the non-layer params and once per layer; a wrapper may wrap
  it (LoRA recognises the gathered weights as its targets) but never calls it itself.
- ``frozen``: the frozen trees of the train state (``TrainState.frozen``: a LoRA base under
  ``"base"``, later a reference model …), by name. A model that needs none ignores it; a wrapper
  hands it on unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from tensordict import TensorDict, TensorDictBase

Batch = TensorDictBase | Mapping[str, torch.Tensor]
Frozen = Mapping[str, Any]
Gather = Callable[[TensorDictBase], TensorDictBase]
"""``gather(stored) -> used``: maps a group of stored params to the tensors the model computes
with. The groups: the non-layer params once (``hidden_states`` leaves an untied ``lm_head``
out), then each layer's params, and for ``head_weight`` (also inside ``logits_from_hidden`` with
a hook) the head's weight alone, as ``{"weight": w}``. The model stays single-device; a
parallel wrapper passes one (:mod:`tscale.parallel.fsdp` all-gathers the shards of a group in
one collective and reduce-scatters its gradients in the backward; it finds the shards by
identity, so any group works). A hook that finds groups by their first leaf (DeepSpeed ZeRO-3's
``ParamsModule.gather``) knows only the root and the layers, which is what ``apply`` uses."""

#: The name under which the frozen trees hold a LoRA base (``TrainState.frozen["base"]``).
BASE = "base"


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model as pure functions over ``params`` (see the module docstring).

    Every method takes the keywords ``gather`` (where it reads params) and ``frozen``; an
    implementation that needs neither ignores them. Implementations may take further keywords
    (``Transformer.init(key, device=)``, ``LoraModel.init(key, dtype=)``).
    """

    @property
    def final_logit_softcap(self) -> float | None:
        """The soft-cap ``logits_from_hidden`` applies after ``h @ head_weight.T`` (Gemma 2's
        ``tanh(z / cap) * cap``; None: none). A fused loss over ``hidden_states`` and
        ``head_weight`` must apply it too."""
        ...

    def init(self, key: torch.Tensor, *, frozen: Frozen | None = None) -> TensorDict:
        """Fresh trainable params from a :mod:`tscale.core.rng` key."""
        ...

    def apply(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] (or [B, M, V] at ``batch["logits_index"]``)."""
        ...

    def hidden_states(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, S, H] (the LM head's input)."""
        ...

    def head_weight(
        self,
        params: TensorDictBase,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The LM head's weight [V, H] as the model computes with it (tied, adapted, gathered)."""
        ...

    def logits_from_hidden(
        self,
        params: TensorDictBase,
        h: torch.Tensor,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The LM head on hidden states, soft-cap included: logits [..., V]."""
        ...

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        frozen: Frozen | None = None,
    ) -> TensorDict:
        """An empty key/value cache for incremental decoding."""
        ...

    def apply_with_cache(
        self,
        params: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        offset: int,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> tuple[torch.Tensor, TensorDictBase]:
        """Logits of new tokens against the cache, and the cache (consumed and returned)."""
        ...


class Wrapper:
    """Base of the wrappers that change only what reaches ``inner`` (``CastModel``,
    ``ShardedModel``, ``OverlappedModel``): every protocol method runs ``inner``'s under
    :meth:`around`, which maps the call's params and ``gather`` hook to those handed on.

    Subclasses set ``inner`` and override :meth:`around` (and ``init``/``init_cache`` where they
    differ); ``frozen`` is handed on unchanged.
    """

    inner: Any

    @contextlib.contextmanager
    def around(
        self, params: TensorDictBase, gather: Gather | None, frozen: Frozen | None
    ) -> Iterator[tuple[TensorDictBase, Gather | None]]:
        """The params and hook ``inner`` gets; the context stays open during its call."""
        yield params, gather

    @property
    def final_logit_softcap(self) -> float | None:
        """The inner model's."""
        return getattr(self.inner, "final_logit_softcap", None)

    def init(self, key: torch.Tensor, **kw: Any) -> TensorDict:
        """The inner model's fresh params."""
        return self.inner.init(key, **kw)

    def apply(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The inner ``apply``."""
        with self.around(params, gather, frozen) as (p, g):
            return self.inner.apply(p, batch, **gather_kw(g), **frozen_kw(frozen))

    def hidden_states(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The inner ``hidden_states``."""
        with self.around(params, gather, frozen) as (p, g):
            return self.inner.hidden_states(p, batch, **gather_kw(g), **frozen_kw(frozen))

    def head_weight(
        self,
        params: TensorDictBase,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The inner ``head_weight``."""
        with self.around(params, gather, frozen) as (p, g):
            return self.inner.head_weight(p, **gather_kw(g), **frozen_kw(frozen))

    def logits_from_hidden(
        self,
        params: TensorDictBase,
        h: torch.Tensor,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The inner ``logits_from_hidden``."""
        with self.around(params, gather, frozen) as (p, g):
            return self.inner.logits_from_hidden(p, h, **gather_kw(g), **frozen_kw(frozen))

    def init_cache(self, batch_size: int, max_length: int, **kw: Any) -> TensorDict:
        """The inner model's cache."""
        return self.inner.init_cache(batch_size, max_length, **kw)

    def apply_with_cache(
        self,
        params: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        offset: int,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> tuple[torch.Tensor, TensorDictBase]:
        """The inner ``apply_with_cache``."""
        with self.around(params, gather, frozen) as (p, g):
            return self.inner.apply_with_cache(
                p, batch, cache, offset, **gather_kw(g), **frozen_kw(frozen)
            )


def gather_kw(gather: Gather | None) -> dict[str, Gather]:
    """``{"gather": gather}``, or ``{}`` for None: hand a hook on only where there is one, so
    plain ``apply(params, batch)`` functions without the keyword keep working."""
    return {} if gather is None else {"gather": gather}


def frozen_kw(frozen: Frozen | None) -> dict[str, Frozen]:
    """``{"frozen": frozen}``, or ``{}`` for None (as :func:`gather_kw`)."""
    return {} if frozen is None else {"frozen": frozen}


def layers(model: Any) -> list[Any]:
    """``model`` and the models it wraps (``.inner``), outermost first."""
    out = [model]
    while getattr(out[-1], "inner", None) is not None:
        out.append(out[-1].inner)
    return out


__all__ = [
    "BASE",
    "Batch",
    "Frozen",
    "Gather",
    "LanguageModel",
    "Wrapper",
    "frozen_kw",
    "gather_kw",
    "layers",
]
