"""Model wrappers that compose, and the one function that stacks them.

Every wrapper implements the whole :class:`~tscale.models.protocol.LanguageModel` protocol
around an ``inner`` model, so a loss, a step or :func:`tscale.models.generate.generate` takes
the stacked model exactly as it takes a bare ``Transformer``.

The order, innermost first (:func:`stack_model` builds the first three; the caller adds the
parallel wrapper around the result)::

    Transformer                        the decoder (pure functions of params)
      └ LoraModel / QLoraModel         params = adapters; frozen base from frozen["base"]
          └ CastModel                  trainable params cast to the compute dtype
              └ ShardedModel (fsdp)    or OverlappedModel (ddp): passes gather= to every method

Why this order: LoRA recognises its target weights by identity in the tree it hands the
decoder, so nothing may copy the base between LoRA and the decoder — the only thing that may,
the parallel ``gather``, goes through LoRA, which adopts the gathered weights as targets. The
cast converts the params the step differentiates (the adapters under LoRA), so it sits right
outside them; the gradient flows back through the cast into the master dtype. The parallel
wrapper is outermost because it maps *stored* tensors (shards, by identity) to the ones used,
and it is the trainer's: under FSDP the layout's ``param_dtype`` casts inside the gather and no
:class:`CastModel` is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.models.lora import Base, LoraConfig, LoraModel
from tscale.models.protocol import Frozen, Gather, LanguageModel, Wrapper
from tscale.models.quant import QLoraModel, QuantizedParams


def cast_floats(params: TensorDictBase, dtype: torch.dtype) -> TensorDictBase:
    """``params`` with every floating-point leaf cast to ``dtype`` (differentiably; a leaf
    already in ``dtype`` is the same tensor)."""
    return params.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


@attrs.frozen(eq=False)
class CastModel(Wrapper):
    """Mixed precision without sharding: the float params are cast to ``dtype`` for every
    method (the cast is differentiable, so gradients come back in the master dtype).

    Only ``params`` (the trainable tree) is cast; frozen trees are handed on as they are
    (store a frozen base in the compute dtype). ``init`` returns master-dtype params;
    ``init_cache`` defaults to a cache in ``dtype``.
    """

    inner: Any
    dtype: torch.dtype

    @contextlib.contextmanager
    def around(
        self, params: TensorDictBase, gather: Gather | None, frozen: Frozen | None
    ) -> Iterator[tuple[TensorDictBase, Gather | None]]:
        """The params cast to ``dtype``; the hook as given."""
        yield cast_floats(params, self.dtype), gather

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        **kw: Any,
    ) -> TensorDict:
        """The inner model's cache, in ``dtype`` (default the compute dtype)."""
        return self.inner.init_cache(
            batch_size, max_length, dtype=dtype or self.dtype, device=device, **kw
        )


def stack_model(
    model: LanguageModel,
    *,
    lora: LoraConfig | None = None,
    base: Base | None = None,
    param_dtype: torch.dtype | None = None,
) -> LanguageModel:
    """The model a step trains: ``model``, then LoRA, then the dtype cast (the order of the
    module docstring). The parallel wrapper (``tscale.parallel.fsdp.ShardedModel`` or
    ``tscale.parallel.ddp.OverlappedModel``) goes around the result, by the caller.

    Args:
        model: the base model (a ``Transformer`` or any
            :class:`~tscale.models.protocol.LanguageModel`).
        lora: LoRA hyper-parameters; None: no adapters (the params are the model's own).
        base: the frozen base of LoRA — a params tree, or
            :class:`~tscale.models.quant.QuantizedParams` for QLoRA (then a ``QLoraModel``).
            None: every call passes it as ``frozen["base"]`` (the train state's frozen tree).
        param_dtype: compute dtype of the trainable params (:class:`CastModel`); None: as
            stored. Leave it None under FSDP (the layout casts inside its gather).

    Returns:
        The stacked model; each layer's ``inner`` is the next one in.
    """
    out: Any = model
    if lora is not None:
        cls = QLoraModel if isinstance(base, QuantizedParams) else LoraModel
        out = cls(model=out, base=base, config=lora)
    if param_dtype is not None:
        out = CastModel(out, param_dtype)
    return out


__all__ = ["CastModel", "cast_floats", "stack_model"]
