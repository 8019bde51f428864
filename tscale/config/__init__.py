"""tscale.config: the attrs schema, strict YAML loading with overrides, and the reference doc."""

from tscale.config.load import load_config, save_config, to_dict, to_yaml
from tscale.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    SchedulerConfig,
    SyntheticConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "SchedulerConfig",
    "SyntheticConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
    "render_reference",
    "save_config",
    "to_dict",
    "to_yaml",
]


def __getattr__(name: str) -> object:
    # Imported lazily so that `python -m tscale.config.reference` does not import it twice.
    if name == "render_reference":
        from tscale.config.reference import render_reference

        return render_reference
    raise AttributeError(f"module 'tscale.config' has no attribute '{name}'")
