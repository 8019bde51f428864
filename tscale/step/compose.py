"""Step builders: ``step(state, batch) -> (state, metrics)``, pure and free of host syncs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDictBase

from tscale.core import metrics as M
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.optim.base import GradientTransformation, apply_updates
from tscale.optim.transforms import skipped_steps

LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, torch.Tensor | M.Metric]]]
"""``loss_fn(params, batch) -> (loss_sum, aux)``: ``aux["tokens"]`` is the normaliser, every other
entry a metric (a summed tensor or a :class:`~tscale.core.metrics.Metric` with its reduction).
When the state holds frozen trees the step calls ``loss_fn(params, batch, frozen=state.frozen)``."""
Metrics = dict[str, torch.Tensor]
StepFn = Callable[[TrainState, TensorDictBase], tuple[TrainState, Metrics]]
GradSync = Callable[
    [TensorDictBase, torch.Tensor, torch.Tensor], tuple[TensorDictBase, torch.Tensor, torch.Tensor]
]
"""``sync(grads, loss_sum, tokens) -> (grads, loss_sum, tokens)``: the data-parallel reduction of
the summed (not yet normalised) gradients, loss and token count of a step (see
:mod:`tscale.parallel`)."""
NormFn = Callable[[TensorDictBase], torch.Tensor]
MetricSync = Callable[[Mapping[str, M.Metric]], dict[str, M.Metric]]
"""``sync(aux) -> aux``: the data-parallel reduction of a step's metrics (each by its reduction,
see :func:`tscale.core.metrics.reduce_over`); called only when a loss returns metrics."""
_RESERVED = ("loss", "grad_norm", "skipped")
UpdateExtra = Callable[[TrainState, TensorDictBase], Mapping[str, Any]]
"""``update_extra(state, batch) -> {name: value}``: extra arguments of the optimizer's update
that come from the objective (Sophia-G's ``hessian``; see :mod:`tscale.step.sophia`)."""


def split_microbatches(batch: TensorDictBase, microbatches: int) -> tuple[TensorDictBase, ...]:
    """Split a batch along its first dim into ``microbatches`` equal parts."""
    size = batch.batch_size[0]
    if microbatches < 1 or size % microbatches:
        raise ShapeError(
            f"batch of {size} examples cannot be split into {microbatches} equal microbatches; "
            "make data.batch_size a multiple of train.microbatches"
        )
    if microbatches == 1:
        return (batch,)
    return tuple(batch.split(size // microbatches, dim=0))


def accumulate(
    loss_fn: LossFn,
    params: TensorDictBase,
    microbatches: tuple[TensorDictBase, ...],
    **kwargs: Any,
) -> tuple[TensorDictBase, torch.Tensor, dict[str, M.Metric]]:
    """Summed gradients, summed loss and the aux metrics combined by their reductions over the
    microbatches (not yet normalised); ``kwargs`` go to every ``loss_fn`` call."""
    grad_fn = value_and_grad(loss_fn)
    (loss_sum, aux), grads = grad_fn(params, microbatches[0], **kwargs)
    merged = {k: M.as_metric(v) for k, v in aux.items()}
    for mb in microbatches[1:]:
        (mb_loss, aux), mb_grads = grad_fn(params, mb, **kwargs)
        torch._foreach_add_(T.leaves(grads), T.leaves(mb_grads))
        loss_sum = loss_sum + mb_loss
        merged = M.combine(merged, aux)
    return grads, loss_sum, merged


def accumulate_gradients(
    loss_fn: LossFn, params: TensorDictBase, microbatches: tuple[TensorDictBase, ...]
) -> tuple[TensorDictBase, torch.Tensor, torch.Tensor]:
    """Summed gradients, summed loss and token count over the microbatches (not yet normalised)."""
    grads, loss_sum, aux = accumulate(loss_fn, params, microbatches)
    return grads, loss_sum, aux[M.NORMALISER].value


def make_train_step(
    loss_fn: LossFn,
    tx: GradientTransformation,
    *,
    microbatches: int = 1,
    donate: bool = True,
    grad_sync: GradSync | None = None,
    grad_norm: NormFn = T.global_norm,
    metric_sync: MetricSync | None = None,
    update_extra: UpdateExtra | None = None,
) -> StepFn:
    """Build a pure train step with gradient accumulation over ``microbatches``.

    The loss of each microbatch is a token *sum*; gradients and loss are divided once by the token
    count of the whole batch, so accumulation equals the one-big-batch step.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss_sum, aux)`` with ``aux["tokens"]``.
        tx: the optimizer transform.
        microbatches: number of equal parts the batch is split into (gradient accumulation).
        donate: if True the step consumes its input state (updates it in place); if False it
            clones the state first and leaves the argument untouched. Results are bit-identical.
        grad_sync: called once per step on the summed gradients, loss and token count of the
            local batch, before the division (data parallelism: an all-reduce for DDP; FSDP
            reduce-scatters the gradients in the backward and syncs only the counts here). The
            division then uses the global token count, so the step equals the one-process step
            on the global batch.
        grad_norm: the global-norm function for the ``grad_norm`` metric (FSDP passes one that
            sums the squares across shards).
        metric_sync: the data-parallel reduction of the loss's own metrics (each by its declared
            reduction); not called when the loss returns none beyond ``tokens``.
        update_extra: ``(state, batch) -> kwargs`` passed to ``tx.update`` (optax's extra
            arguments), computed from the state before the update: an optimizer that needs
            the objective, such as Sophia-G's Hessian estimate.

    Returns:
        ``step(state, batch) -> (new_state, metrics)`` with metrics ``loss`` (mean per token),
        ``tokens`` and ``grad_norm`` (before clipping), ``skipped`` (non-finite steps skipped
        so far) when the optimizer is wrapped in ``skip_nonfinite``, and every metric the loss
        returns, reduced over microbatches and ranks as it declares; all tensors — nothing is
        read on the host.
    """

    def step(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, Metrics]:
        if not donate:
            state = state.clone()
        parts = split_microbatches(batch, microbatches)
        frozen = {"frozen": state.frozen} if state.frozen else {}
        grads, loss_sum, aux = accumulate(loss_fn, state.params, parts, **frozen)
        tokens = aux.pop(M.NORMALISER).value
        if grad_sync is not None:
            grads, loss_sum, tokens = grad_sync(grads, loss_sum, tokens)
        if aux and metric_sync is not None:
            aux = metric_sync(aux)
        denom = tokens.clamp_min(1).to(loss_sum.dtype)
        torch._foreach_div_(T.leaves(grads), denom)
        norm = grad_norm(grads)
        extra = update_extra(state, batch) if update_extra is not None else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        metrics = {"loss": loss_sum / denom, "tokens": tokens, "grad_norm": norm}
        clash = [k for k in aux if k in _RESERVED]
        if clash:
            raise ValueError(f"the loss returns metrics named {clash}: the step sets those itself")
        metrics |= M.finalise(aux)
        skipped = skipped_steps(opt_state)
        if skipped is not None:
            metrics["skipped"] = skipped
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable[[TensorDictBase, Any], Metrics]:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}`` without gradients."""

    def eval_step(params: TensorDictBase, batch: Any, **kwargs: Any) -> Metrics:
        with torch.no_grad():
            loss_sum, aux = loss_fn(params, batch, **kwargs)
        return {"loss_sum": loss_sum, "tokens": M.as_metric(aux[M.NORMALISER]).value}

    return eval_step
