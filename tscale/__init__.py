"""tscale: config-driven LLM training with a functional core on PyTorch.

The top-level names are loaded lazily, so ``import tscale.core`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TrainState": "tscale.core",
    "value_and_grad": "tscale.core",
    "Config": "tscale.config",
    "load_config": "tscale.config",
    "make_train_step": "tscale.step",
    "make_eval_step": "tscale.step",
    "chain": "tscale.optim",
    "adamw": "tscale.optim",
    "Transformer": "tscale.models",
    "TransformerConfig": "tscale.models",
    "train": "tscale.train",
    "TscaleError": "tscale.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tscale' has no attribute {name!r}")
