"""Builders: the one place where the YAML config turns into library objects (house rule 2)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import attrs
import torch
from tensordict import TensorDictBase

from tscale.checkpoint.hf import from_pretrained
from tscale.config.schema import Config, model_max_positions, resolve_defaults
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import ConfigError, ShapeError
from tscale.losses.lm import make_fused_lm_loss, make_lm_loss
from tscale.models.lora import LoraConfig, LoraModel, with_dropout_keys
from tscale.models.quant import make_qlora_model
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import alias, schedules, transforms
from tscale.optim.base import GradientTransformation, chain
from tscale.optim.schedule_free import schedule_free_eval_params
from tscale.step.compile import compile_step
from tscale.step.compose import StepFn, make_train_step
from tscale.step.sophia import make_sophia_train_step

# The data half moved to data_build / data_template; re-exported while the trainer imports it here.
from tscale.train.data_build import DataBundle as DataBundle
from tscale.train.data_build import build_data as build_data
from tscale.train.data_build import sft_examples as sft_examples
from tscale.train.data_template import SelectedTemplate as SelectedTemplate
from tscale.train.data_template import build_encoder as build_encoder
from tscale.train.data_template import prompt_encoder as prompt_encoder
from tscale.train.data_template import question_and_answer as question_and_answer
from tscale.train.data_template import select_template as select_template
from tscale.train.data_template import tokenizer_summary as tokenizer_summary

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express, on the resolved values
    (:func:`~tscale.config.schema.resolve_defaults`); raises ConfigError naming the keys.

    ``train.max_steps`` may still be null (``train.epochs`` decides it once the data is read):
    the step checks then run again through :func:`validate_steps`.
    """
    cfg = resolve_defaults(cfg)
    if cfg.data.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be a multiple of train.microbatches "
            f"({cfg.train.microbatches})"
        )
    assert cfg.data.max_length is not None  # resolved
    for key, value in (
        ("data.batch_size", cfg.data.batch_size),
        ("train.microbatches", cfg.train.microbatches),
        ("train.log_every", cfg.train.log_every),
        ("data.max_length", cfg.data.max_length),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"train.epochs must be above 0, got {cfg.train.epochs}")
    if cfg.train.epochs is not None and cfg.data.streaming and cfg.train.max_steps is None:
        raise ConfigError(
            "train.epochs: data.streaming does not know the number of steps per epoch in "
            "advance; set train.max_steps (the learning-rate schedule needs the total)"
        )
    if cfg.model.hidden_size % cfg.model.num_heads and cfg.model.head_dim is None:
        raise ConfigError(
            f"model.hidden_size ({cfg.model.hidden_size}) must be divisible by model.num_heads "
            f"({cfg.model.num_heads}), or set model.head_dim"
        )
    if cfg.model.path is not None:
        positions = model_max_positions(cfg.model.path)
        key = f"the max_position_embeddings of {cfg.model.path}/config.json"
    else:
        positions, key = cfg.model.max_position_embeddings, "model.max_position_embeddings"
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds {key} ({positions}); "
            "lower data.max_length"
        )
    if cfg.train.max_steps is not None:
        validate_steps(cfg)


def validate_steps(cfg: Config) -> None:
    """The checks that need the run's length (``train.max_steps``, resolved)."""
    steps = cfg.train.max_steps
    if steps is None:
        raise ConfigError("train.max_steps is null: set it or train.epochs")
    if steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {steps}")
    if cfg.scheduler.warmup_steps > steps:
        raise ConfigError(
            f"scheduler.warmup_steps ({cfg.scheduler.warmup_steps}) exceeds train.max_steps "
            f"({steps})"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not a torch device (cpu, cuda, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no CUDA device is available; use cpu")
    return dev


_NOT_ARCHITECTURE = ("path", "dtype", "attention_backend", "norm_backend", "checkpoint_layers")


def build_model(
    cfg: Config, vocab_size: int, key: torch.Tensor
) -> tuple[Transformer, TensorDictBase]:
    """The model of ``cfg.model`` and its initial params: loaded from ``model.path`` (an HF
    checkpoint), else initialised at random from ``key`` with ``vocab_size`` from the tokenizer
    unless ``model.vocab_size`` is set."""
    m = cfg.model
    if m.path is None:
        model = _random_model(cfg, vocab_size)
        return model, model.init(key)
    default = type(m)()
    for f in attrs.fields(type(m)):
        if f.name not in _NOT_ARCHITECTURE and getattr(m, f.name) != getattr(default, f.name):
            raise ConfigError(
                f"model.{f.name} conflicts with model.path: the checkpoint's config.json sets "
                "the architecture; remove model." + f.name
            )
    loaded = from_pretrained(m.path, dtype=_DTYPES[m.dtype])
    config, params = loaded.config, loaded.params
    rows = config.vocab_size
    if rows < vocab_size:
        added = len(cfg.data.tokenizer.add_tokens)
        if not added or vocab_size - added > rows:
            tok = cfg.data.tokenizer.path
            where = f"data.tokenizer.path {tok}" if tok is not None else f"model.path {m.path}'s"
            raise ConfigError(
                f"{where} tokenizer has token ids up to {vocab_size - 1}, but the embedding of "
                f"model.path {m.path} has {rows} rows: use the model's own tokenizer, or list "
                "new tokens in data.tokenizer.add_tokens to grow the embedding"
            )
        config, params = resize_vocab(config, params, vocab_size)
    config = attrs.evolve(
        config,
        attention_backend=m.attention_backend,
        norm_backend=m.norm_backend,
        checkpoint_layers=m.checkpoint_layers,
    )
    return Transformer(config), params


def resize_vocab(
    config: TransformerConfig, params: TensorDictBase, vocab_size: int
) -> tuple[TransformerConfig, TensorDictBase]:
    """``config`` and ``params`` with the embedding (and an untied head) grown to ``vocab_size``
    rows; each new row is the mean of the old rows (a deterministic start that keeps the new
    tokens' logits near the average, as transformers' ``resize_token_embeddings``)."""
    flat = dict(T.flatten(params))
    names = ["model.embed_tokens.weight"]
    if not config.tie_word_embeddings and "lm_head.weight" in flat:
        names.append("lm_head.weight")
    for name in names:
        old = flat[name]
        mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)
        flat[name] = torch.cat([old, mean.expand(vocab_size - old.shape[0], -1)]).contiguous()
    return attrs.evolve(config, vocab_size=vocab_size), T.unflatten(flat)


def _random_model(cfg: Config, vocab_size: int) -> Transformer:
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's ({vocab_size})"
        )
    return Transformer(
        TransformerConfig(
            vocab_size=m.vocab_size or vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.max_position_embeddings,
            rope_theta=m.rope_theta,
            rms_norm_eps=m.rms_norm_eps,
            tie_word_embeddings=m.tie_word_embeddings,
            init_std=m.init_std,
            dtype=_DTYPES[m.dtype],
            attention_backend=m.attention_backend,
            norm_backend=m.norm_backend,
            checkpoint_layers=m.checkpoint_layers,
        )
    )


def _name_keys(message: str, keys: dict[str, str]) -> str:
    """``message`` with the library's argument names replaced by the config keys they come from."""
    for arg, key in keys.items():
        message = re.sub(rf"(?<![\w.]){re.escape(arg)}\b", key, message)
    return message


def _differs(record: Any, field: str) -> bool:
    """True when ``record.field`` is not its schema default (the user set it)."""
    default = attrs.fields_dict(type(record))[field].default
    if isinstance(default, attrs.Factory):
        default = default.factory()
    return getattr(record, field) != default


_SCHEDULE_FIELDS = (
    "min_lr_ratio",
    "num_cycles",
    "decay_fraction",
    "decay_shape",
    "power",
    "timescale",
)


def build_schedule(cfg: Config) -> schedules.Schedule:
    """The learning-rate schedule of ``cfg.scheduler`` over ``train.max_steps``.

    Raises:
        ConfigError: a ``scheduler`` field set that the chosen type does not use, or a value the
            schedule rejects (the message names the config keys).
    """
    cfg = resolve_defaults(cfg)
    if cfg.train.max_steps is None:
        raise ConfigError(
            "train.max_steps is null: train.epochs sets it once the data is read (the trainer "
            "does); set train.max_steps to build the schedule without the data"
        )
    s = cfg.scheduler
    used = schedules.SCHEDULE_ARGS[s.type]
    for field in _SCHEDULE_FIELDS:
        if field not in used and _differs(s, field):
            users = [t for t, args in schedules.SCHEDULE_ARGS.items() if field in args]
            raise ConfigError(
                f"scheduler.{field} is not used by scheduler.type={s.type}; remove it or pick a "
                f"type that uses it ({', '.join(users)})"
            )
    keys = {f: f"scheduler.{f}" for f in (*_SCHEDULE_FIELDS, "warmup_steps")}
    keys |= {"peak": "optimizer.lr", "total_steps": "train.max_steps"}
    try:
        return schedules.build_schedule(
            s.type,
            peak=cfg.optimizer.lr,
            warmup_steps=s.warmup_steps,
            total_steps=cfg.train.max_steps,
            min_lr_ratio=s.min_lr_ratio,
            decay_fraction=s.decay_fraction,
            decay_shape=s.decay_shape,
            num_cycles=s.num_cycles,
            power=s.power,
            timescale=s.timescale,
        )
    except ValueError as err:
        raise ConfigError(f"scheduler.type={s.type}: {_name_keys(str(err), keys)}") from None


# optimizer.<field> -> the factory keyword arguments it feeds (learning_rate: optimizer.lr always)
_OPTIMIZER_KWARGS: dict[str, tuple[str, ...]] = {
    "betas": ("b1", "b2"),
    "eps": ("eps",),
    "weight_decay": ("weight_decay",),
    "no_decay": ("mask",),
    "block_size": ("block_size",),
    "min_8bit_size": ("min_8bit_size",),
    "momentum": ("momentum",),
    "nesterov": ("nesterov",),
    "ns_steps": ("ns_steps",),
    "rho": ("rho",),
    "update_every": ("update_every",),
    "d0": ("d0",),
    "d_coef": ("d_coef",),
    "safeguard_warmup": ("safeguard_warmup",),
}


def decay_mask(cfg: Config) -> transforms.MaskFn | None:
    """Which params the configured optimizer decays: ``optimizer.no_decay`` as a mask, else the
    factory's default mask; None when the factory takes no mask (every param decays)."""
    factory = alias.OPTIMIZERS.get(cfg.optimizer.type)
    params = inspect.signature(factory).parameters if factory is not None else {}
    if "mask" not in params:
        return None
    if cfg.optimizer.no_decay is not None:
        return transforms.no_decay_mask(cfg.optimizer.no_decay)
    return params["mask"].default


def build_optimizer(
    cfg: Config,
    schedule: schedules.Schedule,
    *,
    norm_fn: transforms.NormFn | None = None,
    mask: transforms.MaskFn | str | None = "config",
    clip: bool = True,
) -> GradientTransformation:
    """The optimizer of ``cfg.optimizer`` driven by ``schedule``.

    Each factory of ``tscale.optim.OPTIMIZERS`` gets the keyword arguments its signature names
    (a ``null`` field is not passed: the factory's own default applies); a field set away from
    its default for a type that does not take it is an error. Clipping is added in front of a
    factory that takes no ``max_grad_norm``; ``skip_nonfinite`` wraps the whole chain.

    ``mask`` other than ``"config"`` replaces the decay mask (None: decay every param) and
    ``clip=False`` leaves clipping out: DeepSpeed splits params into decay groups and clips
    across its partitions itself.

    Raises:
        ConfigError: ``optimizer.type`` not registered in this build, a field the type does not
            use, or a value the factory rejects (the message names the config key).
    """
    cfg = resolve_defaults(cfg)
    o = cfg.optimizer
    factory = alias.OPTIMIZERS.get(o.type)
    if factory is None:
        raise ConfigError(
            f"optimizer.type={o.type} is not available in this build; registered: "
            f"{', '.join(sorted(alias.OPTIMIZERS))}"
        )
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def takes(name: str) -> bool:
        return takes_any or name in params

    kwargs: dict[str, Any] = {"learning_rate": schedule}
    if o.type == "schedule_free_adamw":
        # Schedule-free replaces the decay schedule (Defazio et al. 2024): constant lr, own warmup.
        if cfg.scheduler.type != "constant":
            raise ConfigError(
                "optimizer.type=schedule_free_adamw needs no decay schedule: set "
                "scheduler.type: constant (scheduler.warmup_steps becomes its warmup)"
            )
        kwargs = {"learning_rate": o.lr, "warmup_steps": cfg.scheduler.warmup_steps}
    for field, names in _OPTIMIZER_KWARGS.items():
        value = getattr(o, field)
        if not all(takes(n) for n in names):
            if _differs(o, field):
                raise ConfigError(
                    f"optimizer.{field} is not used by optimizer.type={o.type}; remove it"
                )
            continue
        if value is None:  # null: the factory's own default
            continue
        if field == "betas":
            kwargs["b1"], kwargs["b2"] = value
        elif field == "no_decay" and mask != "config":
            continue
        elif field == "no_decay":
            try:
                kwargs["mask"] = transforms.no_decay_mask(value)
            except ValueError as err:
                message = _name_keys(str(err), {"patterns": "optimizer.no_decay"})
                raise ConfigError(message) from None
        else:
            kwargs[names[0]] = value
    if mask != "config" and takes("mask"):
        kwargs["mask"] = mask
    max_grad_norm = o.max_grad_norm if clip else None
    clip_outside = max_grad_norm is not None and not takes("max_grad_norm")
    if takes("max_grad_norm"):
        kwargs["max_grad_norm"] = max_grad_norm
    if norm_fn is not None and takes("norm_fn"):  # sharded params: clip by the whole's norm
        kwargs["norm_fn"] = norm_fn
    keys = {n: f"optimizer.{f}" for f, ns in _OPTIMIZER_KWARGS.items() for n in ns}
    keys |= {"b1": "optimizer.betas[0]", "b2": "optimizer.betas[1]"}
    keys |= {"learning_rate": "optimizer.lr", "max_norm": "optimizer.max_grad_norm"}
    keys["max_grad_norm"] = "optimizer.max_grad_norm"
    try:
        tx = factory(**kwargs)
        if clip_outside:
            tx = chain(transforms.clip_by_global_norm(max_grad_norm, norm_fn=norm_fn), tx)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer.type={o.type}: {_name_keys(str(err), keys)}") from None
    except ImportError as err:
        raise ConfigError(f"optimizer.type={o.type}: {err}") from None
    return transforms.skip_nonfinite(tx) if o.skip_nonfinite else tx


def build_loss(cfg: Config, model: Transformer, apply_fn: Callable) -> Callable:
    """The LM loss of ``cfg.loss``: fused linear cross-entropy, or logits then cross-entropy."""
    lc = cfg.loss
    if lc.fused:
        if cfg.lora.enabled or cfg.optimizer.type == "sophia_g":
            raise ConfigError(
                "loss.fused does not combine with lora.enabled or optimizer.type=sophia_g yet; "
                "set loss.fused: false"
            )
        return make_fused_lm_loss(
            model,
            backend=lc.backend,
            chunk_bytes=lc.chunk_bytes,
            label_smoothing=lc.label_smoothing,
            z_loss=lc.z_loss,
        )
    return make_lm_loss(apply_fn, label_smoothing=lc.label_smoothing, z_loss=lc.z_loss)


def build_step(
    cfg: Config,
    model: Transformer,
    apply_fn: Callable,
    tx: GradientTransformation,
    **parallel: Any,
) -> StepFn:
    """The train step the config implies: Sophia-G needs its Hessian-estimating step, every other
    optimizer the plain ``make_train_step`` over the configured loss; LoRA dropout draws its keys
    from the state's rng and step; ``train.compile`` wraps the whole in ``torch.compile``.
    ``parallel``: ``grad_sync`` / ``grad_norm`` of a data-parallel run (see
    :mod:`tscale.train.distributed`)."""
    t = cfg.train
    if cfg.optimizer.type == "sophia_g":
        step = make_sophia_train_step(apply_fn, tx, microbatches=t.microbatches, donate=t.donate)
    else:
        loss_fn = build_loss(cfg, model, apply_fn)
        step = make_train_step(
            loss_fn, tx, microbatches=t.microbatches, donate=t.donate, **parallel
        )
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        step = with_dropout_keys(step)
    if t.compile:
        step = compile_step(step, backend=t.compile_backend)
    return step


def build_lora_model(cfg: Config, model: Transformer, base: TensorDictBase) -> LoraModel:
    """The LoRA (or QLoRA) wrapper of ``model`` over the frozen ``base`` params."""
    lc = cfg.lora
    try:
        config = LoraConfig(
            rank=lc.rank,
            alpha=lc.alpha,
            dropout=lc.dropout,
            use_dora=lc.use_dora,
            use_rslora=lc.use_rslora,
            **({"targets": tuple(lc.targets)} if lc.targets is not None else {}),
        )
        if lc.qlora:
            return make_qlora_model(
                model.apply, base, config, quantize=config.targets, block_size=lc.qlora_block_size
            )
        return LoraModel(apply_fn=model.apply, base=base, config=config)
    except (ValueError, ShapeError) as err:
        raise ConfigError(f"lora: {str(err).replace('LoraConfig.', 'lora.')}") from None
    except ImportError as err:
        raise ConfigError(
            f"lora.qlora needs bitsandbytes (pip install 'tscale[bnb]'): {err}"
        ) from None


def build_eval_params(cfg: Config) -> Callable[[TrainState], TensorDictBase]:
    """What to evaluate: the params, or for schedule-free AdamW its averaged iterate ``x``
    (training runs on ``y``; Defazio et al. 2024 evaluate ``x``)."""
    if cfg.optimizer.type == "schedule_free_adamw":
        b1 = cfg.optimizer.betas[0] if cfg.optimizer.betas is not None else 0.9
        return lambda state: schedule_free_eval_params(state.params, state.opt_state, b1)
    return lambda state: state.params
