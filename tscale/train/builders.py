"""Builders: the one place where the YAML config turns into library objects (house rule 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from tensordict import TensorDictBase

from tscale.checkpoint.hf import from_pretrained
from tscale.checkpoint.reward import load_reward_model
from tscale.config import rules
from tscale.config.schema import Config, model_max_positions, resolve_defaults
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import ConfigError, ShapeError
from tscale.models.lora import Base, LoraConfig, with_dropout_keys
from tscale.models.protocol import LanguageModel
from tscale.models.quant import quantize_params
from tscale.models.reward import with_score_head
from tscale.models.stack import stack_model
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.base import GradientTransformation, Schedule
from tscale.optim.record import CONFIG_MASK, check_fields
from tscale.optim.transforms import MaskFn, NormFn
from tscale.step.compile import compile_step
from tscale.step.compose import StepFn, make_train_step
from tscale.step.sophia import make_hessian_estimate

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def validate(cfg: Config) -> None:
    """:func:`tscale.config.rules.check` on the resolved values, with ``model.path``'s max
    positions read here; raises ConfigError naming the keys."""
    positions = model_max_positions(cfg.model.path) if cfg.model.path is not None else None
    rules.check(resolve_defaults(cfg, max_positions=positions), checkpoint_positions=positions)


validate_steps = rules.check_steps


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


# The reward head's key is folded from the init key (the decoder's init uses the key itself).
_HEAD_SALT = 0x5C0E
_NOT_ARCHITECTURE = ("path", "dtype", "attention_backend", "norm_backend", "checkpoint_layers")


def param_dtype(cfg: Config) -> torch.dtype:
    """The params dtype of ``model.dtype``."""
    return _DTYPES[cfg.model.dtype]


def build_model(
    cfg: Config, vocab_size: int, key: torch.Tensor, *, reward: bool = False
) -> tuple[Transformer, TensorDictBase]:
    """The model of ``cfg.model`` and its initial params: loaded from ``model.path`` (an HF
    checkpoint), else initialised at random from ``key`` with ``vocab_size`` from the tokenizer
    unless ``model.vocab_size`` is set.

    ``reward=True``: the params of a reward model's decoder (:mod:`tscale.models.reward`): no
    ``lm_head``, and ``score.weight`` from a ``*ForSequenceClassification`` folder, or new (HF's
    init, from a key folded from ``key``) for a causal-LM folder or a random init.
    """
    m = cfg.model
    head_key = R.fold_in(key, _HEAD_SALT)
    if m.path is None:
        model = _random_model(cfg, vocab_size)
        params = model.init(key)
        if reward:
            params = with_score_head(params, head_key, model.config)
        return model, params
    default = type(m)()
    for f in attrs.fields(type(m)):
        if f.name not in _NOT_ARCHITECTURE and getattr(m, f.name) != getattr(default, f.name):
            raise ConfigError(
                f"model.{f.name} conflicts with model.path: the checkpoint's config.json sets "
                "the architecture; remove model." + f.name
            )
    if reward:
        read = load_reward_model(m.path, dtype=_DTYPES[m.dtype], key=head_key)
        config, params = read.config, read.params
    else:
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


def build_schedule(cfg: Config) -> Schedule:
    """The learning-rate schedule of ``cfg.scheduler`` (its record builds it) from
    ``optimizer.lr`` over ``train.max_steps``.

    Raises:
        ConfigError: a value the schedule rejects (the message names the config key).
    """
    cfg = resolve_defaults(cfg)
    if cfg.train.max_steps is None:
        raise ConfigError(
            "train.max_steps is null: train.epochs sets it once the data is read (the trainer "
            "does); set train.max_steps to build the schedule without the data"
        )
    try:
        check_fields(cfg.optimizer)  # the peak is optimizer.lr
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None
    try:
        return cfg.scheduler.build(cfg.optimizer.lr, cfg.train.max_steps)
    except ValueError as err:
        raise ConfigError(f"scheduler.{err}") from None


def decay_mask(cfg: Config) -> MaskFn | None:
    """Which params the configured optimizer decays: ``optimizer.no_decay`` as a mask, else the
    default (not norms, biases, embeddings)."""
    try:
        return cfg.optimizer.decay_mask()
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None


def build_optimizer(
    cfg: Config,
    schedule: Schedule,
    *,
    norm_fn: NormFn | None = None,
    mask: MaskFn | str | None = "config",
    clip: bool = True,
) -> GradientTransformation:
    """The optimizer of ``cfg.optimizer`` (its record builds it) driven by ``schedule``:
    ``skip_nonfinite?(chain(clip_by_global_norm(max_grad_norm)?, optimizer))``.

    ``mask`` other than ``"config"`` replaces the decay mask (None: decay every param) and
    ``clip=False`` leaves clipping out: DeepSpeed splits params into decay groups and clips
    across its partitions itself. An optimizer that replaces the schedule (schedule-free) takes
    ``optimizer.lr`` and ``scheduler.warmup_steps`` instead, with ``scheduler.type: constant``.

    Raises:
        ConfigError: a value the optimizer rejects, or a package it needs is missing (the
            message names the config key).
    """
    cfg = resolve_defaults(cfg)
    o = cfg.optimizer
    lr: float | Schedule = schedule
    warmup_steps = 0
    if o.capabilities.replaces_schedule:
        # Schedule-free replaces the decay schedule (Defazio et al. 2024): constant lr, own warmup.
        if cfg.scheduler.type != "constant":
            raise ConfigError(
                f"optimizer.type={o.type} needs no decay schedule: set "
                "scheduler.type: constant (scheduler.warmup_steps becomes its warmup)"
            )
        lr, warmup_steps = o.lr, cfg.scheduler.warmup_steps
    try:
        return o.build(
            lr,
            warmup_steps=warmup_steps,
            mask=CONFIG_MASK if mask == "config" else mask,
            norm_fn=norm_fn,
            clip=clip,
        )
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None
    except ImportError as err:
        raise ConfigError(f"optimizer.type={o.type}: {err}") from None


def build_step(
    cfg: Config,
    loss_fn: Callable,
    tx: GradientTransformation,
    *,
    apply_fn: Callable,
    rank: int = 0,
    world_size: int = 1,
    **parallel: Any,
) -> StepFn:
    """The train step the config implies: ``make_train_step`` over the task's ``loss_fn``, with
    the Hessian estimate as the optimizer's extra argument when it needs the objective
    (Sophia-G); LoRA dropout draws its keys from the state's rng and step; ``train.compile``
    wraps the whole in ``torch.compile``. ``parallel``: ``grad_sync`` / ``grad_norm`` /
    ``metric_sync`` of a data-parallel run (see :mod:`tscale.train.distributed`)."""
    t = cfg.train
    if cfg.optimizer.capabilities.needs_objective:  # under DDP: reduced like the gradients
        parallel["update_extra"] = make_hessian_estimate(
            apply_fn,
            microbatches=t.microbatches,
            grad_sync=parallel.get("grad_sync"),
            rank=rank,
            world_size=world_size,
        )
    step = make_train_step(loss_fn, tx, microbatches=t.microbatches, donate=t.donate, **parallel)
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        step = with_dropout_keys(step)
    if t.compile:
        step = compile_step(step, backend=t.compile_backend)
    return step


def build_lora_model(
    cfg: Config, model: Transformer, params: TensorDictBase
) -> tuple[LanguageModel, Base]:
    """The LoRA (or QLoRA) stack over ``model`` and its frozen base: ``params``, or with
    ``lora.qlora`` their NF4-quantised targets. The returned model holds no base: every call
    gets it as ``frozen["base"]`` (the train state's frozen tree, checkpointed by folder)."""
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
        base: Base = params
        if lc.qlora:
            base = quantize_params(params, config.targets, block_size=lc.qlora_block_size)
        stacked = stack_model(model, lora=config, base=base)  # checks the targets against it
    except (ValueError, ShapeError) as err:
        text = str(err).replace("LoraConfig.", "lora.")
        key = "lora.targets" if "target pattern" in text else "lora"
        raise ConfigError(f"{key}: {text}") from None
    except ImportError as err:
        raise ConfigError(
            f"lora.qlora needs bitsandbytes (pip install 'tscale[bnb]'): {err}"
        ) from None
    return attrs.evolve(stacked, base=None), base


def build_eval_params(cfg: Config) -> Callable[[TrainState], TensorDictBase]:
    """What to evaluate: the params, or what the optimizer says (schedule-free AdamW: its
    averaged iterate ``x``; training runs on ``y``, Defazio et al. 2024 evaluate ``x``)."""
    o = cfg.optimizer
    if o.capabilities.eval_params:
        return lambda state: o.params_to_evaluate(state.params, state.opt_state)
    return lambda state: state.params
