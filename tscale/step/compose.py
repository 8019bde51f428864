"""Step builders: ``step(state, batch) -> (state, metrics)``, pure and free of host syncs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.optim.base import GradientTransformation, apply_updates
from tscale.optim.transforms import skipped_steps

LossFn = Callable[[TensorDictBase, Any], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
Metrics = dict[str, torch.Tensor]
StepFn = Callable[[TrainState, TensorDictBase], tuple[TrainState, Metrics]]
GradSync = Callable[
    [TensorDictBase, torch.Tensor, torch.Tensor], tuple[TensorDictBase, torch.Tensor, torch.Tensor]
]
"""``sync(grads, loss_sum, tokens) -> (grads, loss_sum, tokens)``: the data-parallel reduction of
the summed (not yet normalised) gradients, loss and token count of a step (see
:mod:`tscale.parallel`)."""
NormFn = Callable[[TensorDictBase], torch.Tensor]
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


def accumulate_gradients(
    loss_fn: LossFn, params: TensorDictBase, microbatches: tuple[TensorDictBase, ...]
) -> tuple[TensorDictBase, torch.Tensor, torch.Tensor]:
    """Summed gradients, summed loss and token count over the microbatches (not yet normalised)."""
    grad_fn = value_and_grad(loss_fn)
    (loss_sum, aux), grads = grad_fn(params, microbatches[0])
    tokens = aux["tokens"]
    for mb in microbatches[1:]:
        (mb_loss, aux), mb_grads = grad_fn(params, mb)
        torch._foreach_add_(T.leaves(grads), T.leaves(mb_grads))
        loss_sum = loss_sum + mb_loss
        tokens = tokens + aux["tokens"]
    return grads, loss_sum, tokens


def make_train_step(
    loss_fn: LossFn,
    tx: GradientTransformation,
    *,
    microbatches: int = 1,
    donate: bool = True,
    grad_sync: GradSync | None = None,
    grad_norm: NormFn = T.global_norm,
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
        update_extra: ``(state, batch) -> kwargs`` passed to ``tx.update`` (optax's extra
            arguments), computed from the state before the update: an optimizer that needs
            the objective, such as Sophia-G's Hessian estimate.

    Returns:
        ``step(state, batch) -> (new_state, metrics)`` with metrics ``loss`` (mean per token),
        ``tokens`` and ``grad_norm`` (before clipping), and ``skipped`` (non-finite steps skipped
        so far) when the optimizer is wrapped in ``skip_nonfinite``; all tensors — nothing is
        read on the host.
    """

    def step(state: TrainState, batch: TensorDictBase) -> tuple[TrainState, Metrics]:
        if not donate:
            state = state.clone()
        parts = split_microbatches(batch, microbatches)
        grads, loss_sum, tokens = accumulate_gradients(loss_fn, state.params, parts)
        if grad_sync is not None:
            grads, loss_sum, tokens = grad_sync(grads, loss_sum, tokens)
        denom = tokens.clamp_min(1).to(loss_sum.dtype)
        torch._foreach_div_(T.leaves(grads), denom)
        norm = grad_norm(grads)
        extra = update_extra(state, batch) if update_extra is not None else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        metrics = {"loss": loss_sum / denom, "tokens": tokens, "grad_norm": norm}
        skipped = skipped_steps(opt_state)
        if skipped is not None:
            metrics["skipped"] = skipped
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable[[TensorDictBase, Any], Metrics]:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}`` without gradients."""

    def eval_step(params: TensorDictBase, batch: Any) -> Metrics:
        with torch.no_grad():
            loss_sum, aux = loss_fn(params, batch)
        return {"loss_sum": loss_sum, "tokens": aux["tokens"]}

    return eval_step
