"""A run's paths, checked before it writes anything (the run directory and its inputs).

:func:`check` runs first in :func:`tscale.train.trainer.train`: the input paths the config names
exist, and the places the run writes (``run.output_dir``, ``data.cache_dir``) are directories it
can write, so a wrong path or a read-only disk is one line naming the key, and no half-written run
directory is left behind. Writability is probed by writing (and removing) a file through the
checkpoint writer's seam (:func:`tscale.checkpoint.io.write_hook`), because permission bits say
nothing for root and nothing about a read-only mount.
"""

from __future__ import annotations

from pathlib import Path

from tscale.checkpoint import io
from tscale.config.schema import Config
from tscale.data.prompt import BUILTIN_TEMPLATES, TEMPLATE_NAMES
from tscale.errors import ConfigError

__all__ = ["check"]


def check(cfg: Config) -> None:
    """Raise ConfigError for a missing input path or an output place that cannot be written.

    Raises:
        ConfigError: one line with the key (``data.train_files[0]``, ``run.output_dir``), the
            path and what to do.
    """
    _check_inputs(cfg)
    _check_output(Path(cfg.run.output_dir), "run.output_dir")
    if cfg.data.cache_dir is not None:
        _check_output(Path(cfg.data.cache_dir), "data.cache_dir")


def _check_inputs(cfg: Config) -> None:
    d = cfg.data
    if cfg.model.path is not None and not Path(cfg.model.path).exists():
        raise ConfigError(
            f"model.path: {cfg.model.path} not found; give a local HF model folder (config.json, "
            "safetensors weights, tokenizer files)"
        )
    reference = getattr(cfg.task, "reference_path", None)
    if reference is not None and not (Path(reference) / "config.json").is_file():
        raise ConfigError(
            f"task.reference_path: {reference} is not an HF model folder (no config.json); give "
            "the folder of the reference model's weights"
        )
    if d.tokenizer.path is not None and not Path(d.tokenizer.path).exists():
        raise ConfigError(
            f"data.tokenizer.path: {d.tokenizer.path} not found; give an HF tokenizer folder "
            "(tokenizer.json + tokenizer_config.json) or a tokenizer.json"
        )
    for key, files in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files)):
        for i, f in enumerate(files):
            if not Path(f).exists():
                raise ConfigError(f"{key}[{i}]: {f} not found")
    for i, source in enumerate(d.sources):
        if source.path is not None and not Path(source.path).exists():
            raise ConfigError(f"data.sources[{i}].path: {source.path} not found")
    _check_template(d.template)


def _check_template(spec: str) -> None:
    """``data.template`` names something: auto, a built-in, Jinja2 source, or a file."""
    if spec == "auto" or spec in BUILTIN_TEMPLATES or "{%" in spec or "{{" in spec:
        return
    path = Path(spec)
    if path.is_file():
        return
    if path.suffix == ".jinja":
        raise ConfigError(f"data.template: template file {spec} not found")
    raise ConfigError(
        f"data.template: unknown template {spec!r}; use auto (the tokenizer's chat_template), "
        f"a built-in ({', '.join(TEMPLATE_NAMES)}), a path to a .jinja file or a Jinja2 string"
    )


def _check_output(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{key}: {path} is a file, not a directory; remove it or choose another {key}"
        )
    try:
        io.check_writable(path)
    except NotADirectoryError as e:
        raise ConfigError(
            f"{key}: {path} cannot be created: {e.filename} is a file; choose another {key}"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{key}: cannot write into {path}: {io.describe_os_error(e, key)}"
        ) from None
