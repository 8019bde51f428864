"""Cross-field rules of a run config: the checks one field's domain cannot express.

A field's own range (``model.hidden_size >= 1``) is declared beside it in the schema and checked
by the loader (:mod:`tscale.config.load`). What is left is here, in one place: keys that must
agree with each other (``data.batch_size`` and ``train.microbatches``), with the run's length
(``train.max_steps``, known once the data is read when ``train.epochs`` decides it) or with the
processes of a distributed run. Every function is pure: it takes the config (and, where a rule
needs them, facts the caller read: the checkpoint's max positions, the world size) and raises a
:class:`~tscale.errors.ConfigError` naming the keys.
"""

from __future__ import annotations

import datetime

from tscale.config.schema import Config
from tscale.errors import ConfigError

__all__ = ["check", "check_parallel", "check_steps"]

_SYNTHETIC_MIN_ITEMS = {"reverse": 1, "sort": 1, "add": 2}  # the items a task's problem needs


def check(cfg: Config, *, checkpoint_positions: int | None = None) -> None:
    """The rules of a resolved config (:func:`~tscale.config.schema.resolve_defaults`).

    ``train.max_steps`` may still be null (``train.epochs`` decides it once the data is read):
    :func:`check_steps` then runs again with the resolved length.

    Args:
        cfg: the config, its null/auto keys resolved.
        checkpoint_positions: the max positions of ``model.path``'s config.json (the caller
            reads it; None: unknown or no ``model.path``).

    Raises:
        ConfigError: keys that contradict each other, named.
        ValueError: ``cfg`` is not resolved (a programming mistake, not the user's).
    """
    if cfg.data.max_length is None:
        raise ValueError("rules.check needs a resolved config (resolve_defaults)")
    if cfg.data.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be a multiple of train.microbatches "
            f"({cfg.train.microbatches})"
        )
    if cfg.train.epochs is not None and cfg.data.streaming and cfg.train.max_steps is None:
        raise ConfigError(
            "train.epochs: data.streaming does not know the number of steps per epoch in "
            "advance; set train.max_steps (the learning-rate schedule needs the total)"
        )
    _check_model(cfg)
    task_rules = getattr(cfg.task, "check", None)
    if task_rules is not None:  # the task's own rules (a user's record may have none)
        task_rules(cfg)
    try:
        datetime.date.fromisoformat(cfg.data.template_date)
    except ValueError:
        raise ConfigError(
            f"data.template_date: {cfg.data.template_date!r} is not a date; write it as YYYY-MM-DD"
        ) from None
    if cfg.model.path is not None:
        positions = checkpoint_positions
        key = f"the max_position_embeddings of {cfg.model.path}/config.json"
    else:
        positions, key = cfg.model.max_position_embeddings, "model.max_position_embeddings"
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds {key} ({positions}); "
            "lower data.max_length"
        )
    if not (cfg.data.train_files or cfg.data.sources):
        _check_synthetic(cfg)
    if cfg.train.max_steps is not None:
        check_steps(cfg)


def check_steps(cfg: Config) -> None:
    """The rules that need the run's length (``train.max_steps``, resolved)."""
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


def check_parallel(cfg: Config, world_size: int, *, sharded: bool) -> None:
    """The rules of a run on ``world_size`` processes (``sharded``: the plan's dp_shard > 1).

    Raises:
        ConfigError: degrees or a batch that do not fit the world, or an option that does not
            combine with sharding, DeepSpeed or overlapped reduction.
    """
    world = world_size
    if cfg.parallel.deepspeed.enabled:
        _check_deepspeed(cfg)
    per_rank, rest = divmod(cfg.data.batch_size, world)
    if rest or per_rank % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must split into {world} equal rank shares, "
            f"each a multiple of train.microbatches ({cfg.train.microbatches})"
        )
    if cfg.train.compile and world > 1:
        raise ConfigError("train.compile is not supported under torchrun yet; set it to false")
    if cfg.data.max_tokens is not None and world > 1:
        raise ConfigError("data.max_tokens (token-budget batches) does not support torchrun yet")
    caps = cfg.optimizer.capabilities
    if world > 1 and caps.needs_objective and cfg.parallel.overlap_reduce:
        raise ConfigError(
            f"optimizer.type={cfg.optimizer.type} under torchrun reduces its Hessian estimate "
            "after the backward; parallel.overlap_reduce does not combine with it: set it false"
        )
    if cfg.parallel.overlap_reduce:
        _check_overlap(cfg, sharded)
    if sharded:
        if not caps.elementwise or caps.needs_objective:  # needs whole tensors per shard
            raise ConfigError(
                f"optimizer.type={cfg.optimizer.type} is not supported with sharded params "
                "(parallel.dp_shard > 1): its update needs whole tensors or global sums; use "
                "parallel.dp_shard: 1 (DDP) or adamw, adamw_8bit, lion, schedule_free_adamw"
            )
        if cfg.lora.enabled and (cfg.lora.qlora or cfg.model.path is None):
            raise ConfigError(
                "lora.enabled with parallel.dp_shard > 1 shards the frozen base loaded from "
                "model.path (the adapters stay replicated); "
                + ("an NF4 base (lora.qlora) is not sharded: use parallel.dp_shard: 1"
                   if cfg.lora.qlora else "set model.path, or use parallel.dp_shard: 1 (DDP)")
            )  # fmt: skip


def _check_model(cfg: Config) -> None:
    """The random-init architecture's shapes (with model.path, its config.json sets them)."""
    m = cfg.model
    if m.path is not None:
        return
    if m.hidden_size % m.num_heads and m.head_dim is None:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads "
            f"({m.num_heads}), or set model.head_dim"
        )
    kv_heads = m.num_heads if m.num_kv_heads is None else m.num_kv_heads
    if m.num_heads % kv_heads:
        raise ConfigError(
            f"model.num_kv_heads ({kv_heads}) must divide model.num_heads ({m.num_heads}): each "
            "key/value head serves a whole group of query heads"
        )
    head_dim = m.hidden_size // m.num_heads if m.head_dim is None else m.head_dim
    if head_dim % 2:
        key = "model.head_dim" if m.head_dim is not None else "model.hidden_size / model.num_heads"
        raise ConfigError(
            f"{key} ({head_dim}) must be even: RoPE rotates pairs of dimensions; choose "
            "another model.head_dim or model.num_heads"
        )


def _check_synthetic(cfg: Config) -> None:
    """The built-in task's bounds (used when no training files are given)."""
    s = cfg.data.synthetic
    if not s.tasks:
        raise ConfigError(
            f"data.synthetic.tasks is empty: list at least one of "
            f"{', '.join(_SYNTHETIC_MIN_ITEMS)} (or give data.train_files)"
        )
    if s.max_items < s.min_items:
        raise ConfigError(
            f"data.synthetic.max_items ({s.max_items}) must be >= data.synthetic.min_items "
            f"({s.min_items})"
        )
    for task in s.tasks:
        need = _SYNTHETIC_MIN_ITEMS.get(task, 1)
        if s.min_items < need:
            raise ConfigError(
                f"data.synthetic.min_items ({s.min_items}) is too small for the {task!r} task "
                f"of data.synthetic.tasks: it needs at least {need}"
            )


def _check_deepspeed(cfg: Config) -> None:
    d, p = cfg.parallel.deepspeed, cfg.parallel
    if p.dp_shard != 1 or p.dp_replicate != -1:
        raise ConfigError(
            "parallel.dp_replicate / parallel.dp_shard do not apply with parallel.deepspeed."
            "enabled: DeepSpeed partitions over all ranks; choose parallel.deepspeed.zero_stage "
            "and leave them at their defaults (-1, 1)"
        )
    caps = cfg.optimizer.capabilities
    if caps.needs_objective or caps.eval_params:
        raise ConfigError(
            f"optimizer.type={cfg.optimizer.type} does not run under parallel.deepspeed "
            "(its Hessian step / averaged iterate lives outside DeepSpeed's optimizer step); "
            "use adamw, adamw_8bit or lion, or tscale's own parallelism"
        )
    if not caps.elementwise:
        raise ConfigError(
            f"optimizer.type={cfg.optimizer.type} needs whole named tensors or sums over all "
            "params, but DeepSpeed hands the optimizer param groups (flat partitions under ZeRO); "
            "use adamw, adamw_8bit or lion, or tscale's own parallelism (parallel.deepspeed."
            "enabled: false)"
        )
    if d.zero_stage == 3 and (cfg.lora.enabled or cfg.loss.fused):
        raise ConfigError(
            "parallel.deepspeed.zero_stage: 3 does not combine with lora.enabled or loss.fused "
            "yet; use zero_stage 2"
        )
    if d.offload_param != "none" and d.zero_stage != 3:
        raise ConfigError("parallel.deepspeed.offload_param needs parallel.deepspeed.zero_stage: 3")
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        raise ConfigError(
            "parallel.deepspeed.offload_optimizer needs parallel.deepspeed.zero_stage >= 1"
        )
    if cfg.train.compile:
        raise ConfigError("train.compile does not combine with parallel.deepspeed; set it false")


def _check_overlap(cfg: Config, sharded: bool) -> None:
    why = [
        reason
        for reason, bad in (
            ("parallel.dp_shard > 1 (FSDP reduces in its own backward)", sharded),
            ("parallel.deepspeed.enabled", cfg.parallel.deepspeed.enabled),
            ("train.microbatches > 1", cfg.train.microbatches > 1),
            ("parallel.param_dtype", cfg.parallel.param_dtype is not None),
            (
                "parallel.reduce_dtype other than model.dtype",
                cfg.parallel.reduce_dtype != cfg.model.dtype,
            ),
            ("lora.enabled", cfg.lora.enabled),
        )
        if bad
    ]
    if why:
        raise ConfigError(
            f"parallel.overlap_reduce does not combine with {', '.join(why)}; set it false"
        )
