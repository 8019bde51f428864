"""DeepSpeed's engine as a data-parallel backend: ZeRO stages 0-3 over the functional model.

DeepSpeed drives an ``nn.Module`` and a ``torch.optim.Optimizer``; tscale has neither, so this
module supplies both as thin views and leaves the rest to DeepSpeed's real engine
(``deepspeed.initialize``):

- :class:`ParamsModule` holds the params tree as ``nn.Parameter``\\ s, one child module per
  transformer layer (and one for everything else), and its ``forward(batch)`` is the functional
  loss, ``(loss_sum, tokens)``. Under ZeRO-3 the model's ``gather`` hook calls the layer's child
  module, so DeepSpeed's own hooks all-gather that layer's partitions just before it runs and
  again for its backward.
- :class:`TransformOptimizer` runs a tscale :class:`~tscale.optim.GradientTransformation` as the
  ``torch.optim.Optimizer`` ZeRO wraps: each ``step()`` updates whatever tensors DeepSpeed put
  into the param groups (ZeRO flattens each group into this rank's fp32 partition). Weight decay
  masks become two param groups (decay / no decay); clipping is DeepSpeed's
  ``gradient_clipping`` (a norm over all partitions), never the transform's own.
- :class:`DeepSpeedRun` is one training step (micro-batches through ``engine.backward`` /
  ``engine.step``), the full params (gathered from the partitions) and checkpoints
  (``engine.save_checkpoint`` / ``load_checkpoint``).

Normalisation follows tscale's rule, not DeepSpeed's: the loss is a token *sum*, each rank
scales it by ``world / global_tokens`` (one all-reduce of the token counts before the backward)
and tells the engine not to divide by the accumulation steps, so DeepSpeed's averaging over ranks
yields the gradient of the mean over every trained token of the global batch — equal to one
process on the same batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase
from torch import nn

from tscale.core import metrics as M
from tscale.core import tree as T
from tscale.errors import CheckpointError
from tscale.losses.lm import IGNORE_INDEX
from tscale.optim.base import GradientTransformation, apply_updates
from tscale.parallel.ddp import make_metric_sync
from tscale.step.compose import split_microbatches

__all__ = [
    "DeepSpeedRun",
    "ParamsModule",
    "TransformOptimizer",
    "deepspeed_config",
    "import_deepspeed",
    "initialize",
]

ENGINE_TAG = "engine"
# DeepSpeed config keys tscale sets from its own YAML (a user's raw config may not set them)
OWNED_KEYS = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size / world size / train.microbatches",
    "gradient_accumulation_steps": "train.microbatches",
    "gradient_clipping": "optimizer.max_grad_norm",
    "optimizer": "optimizer.*",
    "scheduler": "scheduler.*",
    "bf16": "parallel.param_dtype / model.dtype",
    "fp16": "parallel.param_dtype (fp16 with loss scaling is not supported)",
    "communication_data_type": "parallel.reduce_dtype",
    "zero_allow_untested_optimizer": "(always true: the optimizer is tscale's)",
    "zero_optimization.stage": "parallel.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "parallel.deepspeed.offload_param",
}


def import_deepspeed(device: torch.device) -> Any:
    """``import deepspeed`` with its accelerator matching ``device`` (CPU runs set
    ``DS_ACCELERATOR=cpu`` first; DeepSpeed picks it once, at import) and its INFO chatter off.

    Raises:
        ImportError: DeepSpeed is not installed (the message says how to install it).
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            f"parallel.deepspeed needs DeepSpeed: pip install 'tscale[deepspeed]' ({err})"
        ) from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _Untested) for f in deepspeed.utils.logger.filters):
        deepspeed.utils.logger.addFilter(_Untested())
    return deepspeed


class _Untested(logging.Filter):
    """Drops DeepSpeed's "untested optimizer" warning: the optimizer is tscale's by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def deepspeed_config(
    *,
    global_batch: int,
    world_size: int,
    microbatches: int,
    zero_stage: int,
    max_grad_norm: float | None,
    bf16: bool,
    reduce_dtype: torch.dtype,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict of a run; ``extra`` (the user's raw DeepSpeed keys) is merged
    in, nested dicts key by key.

    Raises:
        ValueError: ``extra`` sets a key tscale derives from its own config (the message names
            it as ``config.<path>`` and the tscale key to set instead).
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param}
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size // microbatches,
        "gradient_accumulation_steps": microbatches,
        # DeepSpeed's default is 1.0: 0 turns it off when the YAML has no clipping
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["communication_data_type"] = "fp32" if reduce_dtype == torch.float32 else "bf16"
    for path, value in _flat_items(extra or {}):
        for owned, instead in OWNED_KEYS.items():
            if path == owned or path.startswith(owned + "."):
                raise ValueError(f"config.{path} is set by tscale from {instead}; set that instead")
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config.{path}: {part} is not a section")
        node[leaf] = value
    return cfg


def _flat_items(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            yield from _flat_items(v, path + ".")
        else:
            yield path, v


def _attr(key: str) -> str:
    """A dotted param name as a module attribute name (``nn.Module`` forbids dots)."""
    return key.replace(".", "__")


class _Group(nn.Module):
    """One group of params (a layer, or everything outside the layers) as a module, so that
    ZeRO-3 gathers and releases it as a unit."""

    def __init__(self, tree: TensorDictBase) -> None:
        super().__init__()
        self.keys = T.leaf_keys(tree)
        for key, t in zip(self.keys, T.leaves(tree), strict=True):
            param = nn.Parameter(t.detach().clone(), requires_grad=T.is_float(t))
            self.register_parameter(_attr(key), param)

    def stored(self) -> list[nn.Parameter]:
        return [getattr(self, _attr(k)) for k in self.keys]

    def forward(self) -> tuple[torch.Tensor, ...]:
        """The params as the tensors the layer computes with. Views, not copies: under ZeRO-3
        they keep the gathered storage alive for this step after DeepSpeed repartitions."""
        return tuple(p.view_as(p) for p in self.stored())


class ParamsModule(nn.Module):
    """A params tree as an ``nn.Module`` whose ``forward(batch)`` is the loss
    ``(loss_sum, tokens)``.

    Args:
        params: the trained params (dotted HF-style names; ``model.layers.<i>.*`` become one
            child module per layer).
        make_loss: ``make_loss(gather) -> loss_fn(params, batch) -> (loss_sum, aux)``; ``gather``
            is None unless ``gather_layers``, else the model's :data:`~tscale.models.transformer.
            Gather` hook that calls the layer's child module (ZeRO-3).
        gather_layers: route every layer's params through its child module's ``forward``.
    """

    def __init__(
        self,
        params: TensorDictBase,
        make_loss: Callable[[Callable[[TensorDictBase], TensorDictBase] | None], Callable],
        *,
        gather_layers: bool = False,
    ) -> None:
        super().__init__()
        self.order = T.leaf_keys(params)
        layered = ("model", "layers") in params.keys(True)
        rest = params.exclude(("model", "layers")) if layered else params
        self.root = _Group(rest)
        count = len(params["model", "layers"].keys()) if layered else 0
        self.layers = nn.ModuleList(
            [_Group(params["model", "layers", str(i)]) for i in range(count)]
        )
        # gather() finds a group by its first Parameter (DeepSpeed swaps their .data, never
        # the objects); LoRA trains nothing outside the layers, so the root may be empty
        self._owner = {id(g.stored()[0]): g for g in self.groups() if g.stored()}
        self.loss_fn = make_loss(self.gather if gather_layers else None)
        self.metrics: dict[str, Any] = {}  # the last forward's metrics beyond the token count

    def groups(self) -> list[_Group]:
        return [self.root, *self.layers]

    def named_leaves(self) -> dict[str, nn.Parameter]:
        """Every param by its tscale name, in the order of the original tree."""
        found: dict[str, nn.Parameter] = {}
        for k, p in zip(self.root.keys, self.root.stored(), strict=True):
            found[k] = p
        for i, layer in enumerate(self.layers):
            for k, p in zip(layer.keys, layer.stored(), strict=True):
                found[f"model.layers.{i}.{k}"] = p
        return {k: found[k] for k in self.order}

    def tree(self) -> TensorDict:
        """The stored params as a tree (the Parameters themselves: under ZeRO-3 their data
        is this rank's partition until gathered)."""
        return T.unflatten(self.named_leaves())

    def gather(self, stored: TensorDictBase) -> TensorDictBase:
        """The model's gather hook: run the group's module (ZeRO-3 fetches it around the call)."""
        group = self._owner[id(T.leaves(stored)[0])]
        tensors = group()
        return T.unflatten(dict(zip(group.keys, tensors, strict=True)))

    def forward(self, batch: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, aux = self.loss_fn(self.tree(), batch)
        # the loss's own metrics beside the engine's output (DeepSpeed sees only tensors)
        self.metrics = {k: v for k, v in aux.items() if k != M.NORMALISER}
        return loss_sum, aux[M.NORMALISER]


class _TxState:
    """A transform's state in ``torch.optim`` state: opaque to DeepSpeed (not a tensor, not a
    dict), so ZeRO saves and restores it whole instead of slicing off padding."""

    def __init__(self, tree: TensorDictBase) -> None:
        self.tree = tree


class TransformOptimizer(torch.optim.Optimizer):
    """A tscale transform behind the ``torch.optim.Optimizer`` interface.

    Each ``step()`` makes one tree of the tensors in each param group (``p0``, ``p1``, …), runs
    the group's transform on their ``.grad``\\ s and applies the updates in place. The state of a
    group lives in ``self.state[<its first tensor>]["tscale"]``, so DeepSpeed's ZeRO checkpoints
    carry it (and its sub-group steps each get their own).

    Args:
        groups: ``[{"params": [...], "decay": bool}, ...]``.
        make_tx: ``make_tx(decay) -> GradientTransformation`` for a group (with or without weight
            decay; without clipping).
        any_nonfinite: under ZeRO each rank holds different partitions; this reduces a local
            "some gradient is non-finite" flag over the ranks so that ``skip_nonfinite`` skips
            the step on every rank or on none (None: no reduction).
    """

    def __init__(
        self,
        groups: Sequence[dict[str, Any]],
        make_tx: Callable[[bool], GradientTransformation],
        *,
        any_nonfinite: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__([dict(g) for g in groups], {"lr": 0.0, "decay": True})
        self._tx = {True: make_tx(True), False: make_tx(False)}
        self._any_nonfinite = any_nonfinite
        # DeepSpeed's wrappers may call step() once with zero gradients while they set up
        # (stage 0 with bf16 does, to create torch optimizers' state); until armed, a step only
        # creates the state, so the transform's count and schedule start at the first real step
        self.armed = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("TransformOptimizer.step takes no closure")
        work = []
        for group in self.param_groups:
            tensors = [p for p in group["params"] if p.grad is not None]
            if tensors:
                work.append((group, tensors))
        if not work:
            return
        if self._any_nonfinite is not None and self.armed:
            grads = [p.grad for _, ts in work for p in ts]
            bad = torch.zeros((), dtype=torch.float32, device=grads[0].device)
            for g in grads:
                bad = bad + (~torch.isfinite(g)).any().float()
            if bool(self._any_nonfinite(bad) > 0):  # a rank saw inf/NaN: all skip this step
                first = grads[0].view(-1)
                first[:1] = float("nan")
        for group, tensors in work:
            tx = self._tx[bool(group["decay"])]
            params = TensorDict({f"p{i}": p.data for i, p in enumerate(tensors)}, batch_size=[])
            grads = TensorDict({f"p{i}": p.grad for i, p in enumerate(tensors)}, batch_size=[])
            slot = self.state[tensors[0]]
            if "tscale" not in slot:
                slot["tscale"] = _TxState(tx.init(params))
            if not self.armed:
                continue
            updates, new_state = tx.update(grads, slot["tscale"].tree, params)
            new_params = apply_updates(params, updates)
            for p, new in zip(tensors, T.leaves(new_params), strict=True):
                if new.data_ptr() != p.data_ptr():  # the transform returned new storage
                    p.data.copy_(new)
            slot["tscale"] = _TxState(new_state)


class DeepSpeedRun:
    """A DeepSpeed engine over a :class:`ParamsModule`: the step, the full params, checkpoints.

    Build it with :func:`initialize`.
    """

    def __init__(self, engine: Any, module: ParamsModule, *, dtypes: Mapping[str, torch.dtype]):
        self.engine = engine
        self.module = module
        self.dtypes = dict(dtypes)
        self.zero_stage = int(engine.zero_optimization_stage())
        self.world_size = dist.get_world_size()

    def stored_params(self) -> TensorDict:
        """The module's Parameters as a tree (live: DeepSpeed updates them; partitions under
        ZeRO-3)."""
        return self.module.tree()

    def step(self, batch: TensorDictBase, microbatches: int) -> dict[str, torch.Tensor]:
        """One optimizer step over this rank's share of the global batch."""
        parts = split_microbatches(batch, microbatches)
        counts = torch.stack([(mb["labels"] != IGNORE_INDEX).sum() for mb in parts])
        tokens = counts.sum().to(torch.float64).reshape(1)
        dist.all_reduce(tokens)
        scale = self.world_size / tokens.clamp_min(1)
        loss_total = torch.zeros(1, dtype=torch.float64, device=tokens.device)
        aux: dict[str, M.Metric] = {}
        for mb in parts:
            loss_sum, _ = self.engine(mb)
            mb_aux = self.module.metrics
            self.engine.backward(loss_sum * scale.to(loss_sum.dtype), scale_wrt_gas=False)
            self.engine.step()
            loss_total += loss_sum.detach().double()
            aux = M.combine(aux, mb_aux) if aux else {k: M.as_metric(v) for k, v in mb_aux.items()}
        dist.all_reduce(loss_total)
        metrics = {
            "loss": (loss_total / tokens.clamp_min(1)).reshape(()),
            "tokens": tokens.reshape(()).to(torch.int64),
        }
        if aux:  # the loss's own metrics, reduced over the ranks as each declares
            metrics |= M.finalise(make_metric_sync(None)(aux))
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = torch.as_tensor(float(norm), dtype=torch.float64)
        return metrics

    def _unfused_masters(self) -> dict[int, torch.Tensor]:
        """Stage 0 with bf16: DeepSpeed's unfused optimizer keeps one fp32 copy per module
        param (``fp32_groups`` beside ``fp16_groups``); by module-param id."""
        opt = self.engine.optimizer
        low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
        if not low or not high:
            return {}
        pairs = (zip(lows, highs, strict=True) for lows, highs in zip(low, high, strict=True))
        return {id(p): m for group in pairs for p, m in group}

    def full_params(self) -> TensorDict:
        """The whole params on every rank, in the run's dtypes: the fp32 masters where
        DeepSpeed keeps them (bf16, ZeRO); every rank must call it (it all-gathers)."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = self._unfused_masters()
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_leaves().items():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                full = masters.get(id(p), p).detach()
            shape = getattr(p, "ds_shape", p.shape)
            out[name] = full.detach().reshape(shape).to(self.dtypes[name]).clone()
        return T.unflatten(out)

    def set_masters(self, params: TensorDictBase) -> None:
        """Overwrite DeepSpeed's fp32 masters with ``params`` (full tensors). DeepSpeed makes
        its masters from the module after casting it to bf16, so they start rounded; this
        restores the exact initial values (as tscale's ``param_dtype`` keeps them). Every rank
        must call it (ZeRO sets its partitions)."""
        from deepspeed.utils import safe_set_full_fp32_param

        masters = self._unfused_masters()
        flat = T.flatten(params)
        with torch.no_grad():
            for name, p in self.module.named_leaves().items():
                if not p.requires_grad:
                    continue
                value = flat[name].to(torch.float32)
                if id(p) in masters:
                    masters[id(p)].copy_(value.reshape(masters[id(p)].shape))
                else:
                    safe_set_full_fp32_param(p, value)

    def save(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (module, optimizer partitions) into ``directory``; a
        collective: every rank writes its partitions."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (same world size and ZeRO stage)."""
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=ENGINE_TAG, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no engine checkpoint to load")


def _groups(
    module: ParamsModule, decays: Callable[[str, torch.Tensor], bool] | None
) -> list[dict[str, Any]]:
    """Decay / no-decay param groups (one group when every param decays)."""
    yes, no = [], []
    for name, p in module.named_leaves().items():
        if not p.requires_grad:
            continue
        (yes if decays is None or decays(name, p) else no).append(p)
    return [{"params": ps, "decay": d} for ps, d in ((yes, True), (no, False)) if ps]


def initialize(
    params: TensorDictBase,
    *,
    make_loss: Callable[[Callable[[TensorDictBase], TensorDictBase] | None], Callable],
    make_tx: Callable[[bool], GradientTransformation],
    decays: Callable[[str, torch.Tensor], bool] | None,
    config: Mapping[str, Any],
    device: torch.device,
    skip_nonfinite: bool = False,
) -> DeepSpeedRun:
    """Build the DeepSpeed engine of a run. Joins a one-process group first when no group
    exists (DeepSpeed needs one even alone).

    Args:
        params: the initial params (every rank the same values).
        make_loss: see :class:`ParamsModule` (gather is passed under ZeRO-3).
        make_tx: the optimizer of a param group, ``make_tx(decay)``, without clipping.
        decays: the weight-decay mask ``decays(name, tensor)``; None: every param decays.
        config: the DeepSpeed config (:func:`deepspeed_config`).
        device: where the module lives.
        skip_nonfinite: the transform skips non-finite steps; make every rank agree.
    """
    deepspeed = import_deepspeed(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's launcher check reads it
    stage = int(config["zero_optimization"]["stage"])
    module = ParamsModule(params, make_loss, gather_layers=stage == 3).to(device)
    dtypes = {k: v.dtype for k, v in T.flatten(params).items()}

    def any_nonfinite(flag: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flag)
        return flag

    # only partitions differ between ranks; stage 0 hands every rank the same reduced gradients
    agree = skip_nonfinite and stage >= 1 and dist.get_world_size() > 1
    optimizer = TransformOptimizer(
        _groups(module, decays), make_tx, any_nonfinite=any_nonfinite if agree else None
    )
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=dict(config), dist_init_required=False
    )
    optimizer.armed = True
    run = DeepSpeedRun(engine, module, dtypes=dtypes)
    if config.get("bf16", {}).get("enabled"):
        run.set_masters(params)  # DeepSpeed's masters come from the bf16-cast module
    return run
