"""Models as pure functions: ``init(config, key) -> params`` and ``apply(config, params, batch)``.

Parameters are nested TensorDicts named exactly like the HF checkpoint of the same architecture.
HF checkpoint directories are read and written by ``tscale.checkpoint.hf`` (``from_pretrained``,
``save_pretrained``), into the :class:`Model` record
of ``tscale.models.hf``. Every model implements one protocol (:class:`LanguageModel`); the
wrappers (LoRA, :class:`CastModel`, the parallel ones) implement it around another model and
:func:`stack_model` stacks them in their one order. :class:`RewardModel` puts a scalar
``score`` head on any of them (``tscale.models.reward``).
"""

from tscale.models.generate import CachedModel, filter_logits, generate, greedy
from tscale.models.hf import Model
from tscale.models.protocol import LanguageModel
from tscale.models.reward import RewardHead, RewardModel, sequence_ends
from tscale.models.stack import CastModel, stack_model
from tscale.models.transformer import (
    FAMILIES,
    RopeScaling,
    Transformer,
    TransformerConfig,
    apply,
    apply_with_cache,
    hidden_states,
    init,
    init_cache,
    logits_from_hidden,
    param_shapes,
)

__all__ = [
    "FAMILIES",
    "CachedModel",
    "CastModel",
    "LanguageModel",
    "Model",
    "RewardHead",
    "RewardModel",
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "apply",
    "apply_with_cache",
    "filter_logits",
    "generate",
    "greedy",
    "hidden_states",
    "init",
    "init_cache",
    "logits_from_hidden",
    "param_shapes",
    "sequence_ends",
    "stack_model",
]
