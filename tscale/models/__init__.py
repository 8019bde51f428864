"""Models as pure functions: ``init(config, key) -> params`` and ``apply(config, params, batch)``.

Parameters are nested TensorDicts named exactly like the HF checkpoint of the same architecture.
"""

from tscale.models.generate import greedy
from tscale.models.transformer import (
    Transformer,
    TransformerConfig,
    apply,
    hidden_states,
    init,
    logits_from_hidden,
    param_shapes,
)

__all__ = [
    "Transformer",
    "TransformerConfig",
    "apply",
    "greedy",
    "hidden_states",
    "init",
    "logits_from_hidden",
    "param_shapes",
]
