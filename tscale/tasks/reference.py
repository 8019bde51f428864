"""Reference models for objectives with a KL or preference term (DPO, PPO/GRPO with β > 0).

Two strategies, each a frozen tree in the train state (``TrainState.frozen``) and a function
that runs the reference forward without building a graph:

- :func:`frozen_copy`: the starting weights (from ``model.path`` or the random init) as the
  ``"reference"`` tree. From a folder it is checkpointed by the folder and a fingerprint, not
  copied into every checkpoint.
- :func:`lora_base_reference`: with LoRA the base *is* the starting model — the adapters off —
  so the reference costs no copy: it runs the stack's inner model on ``frozen["base"]``.

A task picks one in its ``prepare(ctx)`` (the trees to add) and calls :func:`reference_apply`
in its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.errors import ConfigError
from tscale.models.protocol import frozen_kw
from tscale.parallel.fsdp import ShardedModel
from tscale.tasks.base import FrozenTree, TaskContext

__all__ = ["REFERENCE", "frozen_copy", "lora_base_reference", "reference_apply"]

REFERENCE = "reference"
"""The name of the reference model's frozen tree."""
_BASE = "base"


def frozen_copy(ctx: TaskContext) -> dict[str, FrozenTree]:
    """The starting weights as the ``"reference"`` frozen tree (a copy: training changes the
    params in place), recorded by ``model.path`` when they came from it."""
    copy = T.clone(ctx.params)
    return {REFERENCE: FrozenTree(copy.lock_() if not copy.is_locked else copy, ctx.source)}


def lora_base_reference(ctx: TaskContext) -> dict[str, FrozenTree]:
    """No tree to add: the LoRA base (already frozen, ``frozen["base"]``) is the reference."""
    if _BASE not in ctx.frozen:
        raise ValueError("lora_base_reference needs lora.enabled (the base is the reference)")
    if not isinstance(ctx.frozen[_BASE], TensorDictBase):  # QLoRA: NF4 codes, no plain forward
        raise ConfigError(
            "task.reference: the LoRA base (auto or lora_base with lora.enabled) is NF4-quantised "
            "(lora.qlora) and cannot run as the reference; set lora.qlora: false (dpo: or "
            "task.reference: none)"
        )
    return {}


def reference_apply(ctx: TaskContext) -> Callable[[TensorDictBase, Mapping[str, Any]], Any]:
    """``ref(batch, frozen) -> logits`` of the reference model, under ``torch.no_grad``: the
    ``"reference"`` tree through the base model, else the LoRA stack's inner model over the
    base (the adapters off)."""
    decoder = _decoder(ctx.model)  # the stack's innermost model: the plain forward
    if isinstance(ctx.model, ShardedModel) and ctx.model.tree == _BASE:
        # LoRA over a sharded base: the step hands the loss this rank's shards of
        # frozen["base"]; the decoder runs them through the same per-layer gather
        decoder = attrs.evolve(ctx.model, inner=decoder)

    def ref(batch: Any, frozen: Mapping[str, Any]) -> torch.Tensor:
        tree = frozen.get(REFERENCE, frozen.get(_BASE))
        if tree is None:
            raise KeyError("no reference model: prepare() added none and there is no LoRA base")
        if not isinstance(tree, TensorDictBase):
            raise TypeError(
                f"the reference is a {type(tree).__name__} (a quantised QLoRA base); use "
                "frozen_copy, or LoRA without lora.qlora"
            )
        with torch.no_grad():
            return decoder.apply(tree, batch, **frozen_kw(frozen or None))

    return ref


def _decoder(model: Any) -> Any:
    while getattr(model, "inner", None) is not None:
        model = model.inner
    return model
