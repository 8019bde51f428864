"""The task seam: what one training objective supplies to the trainer.

A task is one module (``tscale/tasks/sft.py`` …, or a user's own module named in YAML as
``task.type: package.module:ClassName``). Its config record is a frozen attrs class with a
``type`` field; the record *is* the task: the trainer calls its methods, never branches on its
name. Everything but :meth:`Task.loss` has a default, so a task that only changes the objective
is a loss function and a record (docs/tasks.md walks through one).

The contract, in the order the trainer uses it:

- ``examples(cfg, encoder, template)``: the per-record data stage (records → examples, its
  batch layout, ``Err``/``Dropped`` for what it leaves out); SFT's is the template, the loss
  mask and the length budget (``tscale.tasks.sft.sft_examples``), inherited by subclasses.
- ``check(config)``: the task's own cross-field rules (raise ``ConfigError`` naming the keys),
  run with the config's rules before anything is built.
- ``prepare(ctx)``: a pre-pass before the first step (e.g. reference log-probs computed once,
  a frozen copy of the starting weights as the reference model); returns the frozen trees it
  adds to the state, each a :class:`FrozenTree` (with the folder it came from, when it did, so
  that checkpoints record the folder instead of a copy).
- ``rollout(ctx)``: a batch stage that depends on the state, ``fn(state, batch, key) ->
  batch`` (online RL's generations, KTO's reference point over the whole batch), run before
  the updates of each batch; None (the default) for none.
  A rollout that carries host-side state from batch to batch (online RL: the rewards'
  failure window) is a :class:`StatefulRollout`: every checkpoint saves its ``state_dict()``
  (one per rank) and a resumed run gives it back to ``load_state_dict``, as it does the data
  loader's cursor, so that a resumed run behaves as the uninterrupted one.
- ``loss(ctx)``: ``loss_fn(params, batch, *, frozen=...) -> (loss_sum, aux)`` with
  ``aux["tokens"]`` the normaliser and every other entry a metric with its reduction
  (:mod:`tscale.core.metrics`); pure, no host sync.
- ``updates_per_batch``: optimizer steps taken on one (rolled-out) batch.
- ``has_eval(data, config)``: whether the run's data gives :meth:`evaluate` anything to do
  (the loop says "no held-out data" once instead of evaluating nothing).
- ``evaluate(ctx, params, frozen)``: held-out metrics and sample generations.
- ``key_metrics``: the metrics the progress line shows beside the loss.
- ``run_defaults`` (optional class attribute): the task's own defaults of the run-dependent
  null/auto keys, e.g. online RL's ``{"data.group_by_length": False}``; they win over the
  fine-tuning / random-init defaults, never over a key the user set.
- ``head`` (optional class attribute, ``"lm"`` when absent): ``"score"`` makes the run build a
  reward model — the decoder without its LM head plus ``score.weight``
  (:mod:`tscale.models.reward`), wrapped by the task's ``wrap_model(model, config, pad_id=)``
  (the LoRA stack's adapters and the head train), exported as ``*ForSequenceClassification``.
- ``extend_model(model, params, config, *, key, read_reward)`` (optional): trainable trees
  the task adds beside the model's params (PPO's value head or critic), returning ``(model,
  params)``: the model runs on the extended params (the policy on its part of them), the
  params hold the new trees, which train, checkpoint and resume with the rest. ``config`` is
  the decoder's :class:`~tscale.models.transformer.TransformerConfig`, ``key`` a fresh
  :mod:`tscale.core.rng` key, ``read_reward(path, dtype=, device=)`` loads an HF
  ``*ForSequenceClassification`` folder (``tscale.checkpoint.reward.load_reward_model``).
- ``export_params(params)`` (optional): the params ``tscale export`` writes (PPO: without the
  value trees).
- ``callbacks(ctx)`` (optional, looked up with ``hasattr``): the task's own callbacks
  (:class:`tscale.train.callbacks.Callback` hooks), added after the built-in loggers; online
  RL's warning when the training forward leaves the sampler's log-probs.
- ``checkpoint_meta(ctx)`` and ``check_resume(saved, current)`` (optional): JSON-able facts
  every checkpoint records (under ``extra.task``) and the check a resumed run makes against
  them (online RL: the reward functions' fingerprints).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import torch
from tensordict import TensorDictBase

from tscale.core.state import TrainState
from tscale.errors import ConfigError

__all__ = [
    "TASKS",
    "FrozenTree",
    "RolloutFn",
    "StatefulRollout",
    "Task",
    "TaskContext",
    "register_task",
    "resolve_task_class",
]

LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, Any]]]
RolloutFn = Callable[[TrainState, TensorDictBase, torch.Tensor], TensorDictBase]
"""``rollout(state, batch, key) -> batch``: a batch stage that reads the state (no update)."""


@attrs.frozen(kw_only=True)
class TaskContext:
    """What a task may use to build its loss, pre-pass and eval: the model (the composed
    protocol object the step differentiates through), the run's data bundle, the device and
    the resolved run config (for the sections the task reads, e.g. ``loss`` and ``eval``), and
    the host-side batch stage the loop applies before each step (``prepare_batch``)."""

    model: Any
    apply_fn: Callable[..., torch.Tensor]
    data: Any
    device: torch.device
    config: Any
    prepare_batch: Callable[[TensorDictBase], TensorDictBase] = lambda batch: batch
    params: Any = None
    """The trainable params at the start (after init or loading; before any step)."""
    frozen: Mapping[str, Any] = attrs.field(factory=dict)
    """The frozen trees built so far (e.g. ``"base"``, the LoRA base)."""
    source: str | None = None
    """The folder the starting weights came from (``model.path``), None from random init."""
    weights_fingerprint: Callable[[Any], str] | None = None
    """``fingerprint(tree)``: the content fingerprint of the starting weights — the folder's
    (``tscale.checkpoint.frozen``) when they came from one, else of ``tree``'s tensors (a
    cache key for what a task computes from them once, e.g. reference log-probs)."""
    read_folder: Callable[[str], tuple[Any, str]] | None = None
    """``read_folder(path) -> (params, fingerprint)``: another HF causal-LM folder's weights
    in the run's dtype on its device, and the folder's content fingerprint (a cache key, as
    ``weights_fingerprint``'s) — for a reference model from another folder."""


@attrs.frozen
class StatefulRollout:
    """A rollout stage and the host-side state it carries between batches: ``state_dict()``
    returns it JSON-able (saved in every checkpoint), ``load_state_dict(saved)`` restores it
    on resume."""

    fn: RolloutFn
    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], None]

    def __call__(self, state: TrainState, batch: TensorDictBase, key: torch.Tensor) -> Any:
        return self.fn(state, batch, key)


@attrs.frozen
class FrozenTree:
    """A frozen tree a task adds to the state, and the HF folder it was loaded from (None: it is
    saved in every checkpoint)."""

    tree: Any
    source: str | None = None


@runtime_checkable
class Task(Protocol):
    """One objective. See the module docstring for the contract."""

    type: str
    key_metrics: ClassVar[tuple[str, ...]]
    updates_per_batch: ClassVar[int]

    def loss(self, ctx: TaskContext) -> LossFn: ...

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]: ...

    def check(self, config: Any) -> None: ...

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]: ...

    def rollout(self, ctx: TaskContext) -> RolloutFn | None: ...

    def has_eval(self, data: Any, config: Any) -> bool: ...

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]: ...


class TaskDefaults:
    """The defaults of the optional parts of :class:`Task` (inherit them)."""

    key_metrics: ClassVar[tuple[str, ...]] = ()
    updates_per_batch: ClassVar[int] = 1
    run_defaults: ClassVar[Mapping[str, Any]] = {}
    """The task's own values of the run-dependent null/auto keys (``data.group_by_length`` …),
    which ``tscale.config.schema.resolve_defaults`` uses before the fine-tuning / random-init
    table; a key the user set always wins."""

    def check(self, config: Any) -> None:
        """No rules beyond the fields' own domains."""

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        """No pre-pass: no frozen trees added."""
        return {}

    def rollout(self, ctx: TaskContext) -> RolloutFn | None:
        """No state-dependent batch stage."""
        return None

    def has_eval(self, data: Any, config: Any) -> bool:
        """Whether there is held-out data and the task evaluates it (overrides
        :meth:`evaluate`)."""
        evaluates = type(self).evaluate is not TaskDefaults.evaluate
        return evaluates and bool(data.eval_examples or data.eval_records)

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """No held-out evaluation."""
        return {}, []


TASKS: dict[str, type] = {}
"""Built-in task records by ``type`` (``register_task`` adds to it)."""


def register_task(cls: type) -> type:
    """Class decorator: make ``cls`` (an attrs record with a ``type`` default) a built-in task."""
    name = attrs.fields_dict(cls)["type"].default
    TASKS[name] = cls
    return cls


def resolve_task_class(name: str, key: str = "task.type") -> type:
    """The record class of ``task.type``: a registered name, or ``module:ClassName`` imported
    (a user's task module on the Python path).

    Raises:
        ConfigError: unknown name, a module that does not import, or a class that is not a task.
    """
    if name in TASKS:
        return TASKS[name]
    if ":" not in name:
        known = ", ".join(sorted(TASKS))
        raise ConfigError(
            f"{key}: unknown task {name!r}; built-in: {known}, or module:ClassName for your own"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}: cannot import {module_name!r} ({err}); is its folder on PYTHONPATH?"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None or not attrs.has(cls) or "type" not in attrs.fields_dict(cls):
        raise ConfigError(
            f"{key}: {name} is not a task record (an attrs class with a `type` field) in "
            f"{module_name}"
        )
    return cls
