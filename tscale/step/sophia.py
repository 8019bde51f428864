"""Sophia-G's Hessian estimate for the train step: Gauss-Newton-Bartlett, as an extra argument.

Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (ICLR 2024), Algorithm 2 (GNB): take the model's logits on the batch, sample labels
``yhat ~ softmax(logits)``, take ``ghat``, the gradient of the mean cross-entropy against ``yhat``
over the ``B`` trained tokens, and return ``hhat = B * ghat * ghat``. The generic step
(:func:`tscale.step.make_train_step`) calls :func:`make_hessian_estimate`'s function through its
``update_extra`` hook and passes ``hessian=hhat`` to the optimizer's update
(:func:`tscale.optim.sophia.sophia_g`), which folds it into its Hessian EMA every
``update_every`` updates; when is decided on the device by its ``hessian_due`` state flag.

**No host sync, at a price.** Eager PyTorch cannot skip work on a device value without reading
it, so by default the estimator runs on *every* step and the optimizer folds it in with weight 0
on the other steps (a second forward and backward per step). ``host_branch=True`` instead reads
the ``hessian_due`` flag on the host once per step (one sync) and runs the estimator only when it
is due (the reference implementation's cost, ~1.1x a plain step at ``update_every = 10``); both
modes give bit-identical states.

Sampling is on the device too: the uniforms come from the counter-based key
``fold_in(state.rng, state.step)`` (:mod:`tscale.core.rng`) and pick labels by inverting the
softmax CDF, so no ``torch.Generator`` (whose seed would be read on the host) is needed. The
uniforms are drawn for the whole batch before it is split, so microbatching does not change the
estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.metrics import NORMALISER
from tscale.core.state import TrainState
from tscale.losses.lm import IGNORE_INDEX, token_cross_entropy
from tscale.optim.sophia import hessian_due
from tscale.step.compose import GradSync, UpdateExtra, accumulate, split_microbatches

__all__ = ["make_hessian_estimate", "sample_categorical", "uniform"]

ApplyFn = Callable[[TensorDictBase, Any], torch.Tensor]

_UNIFORM_KEY = "_sophia_uniform"  # carried inside the batch so that microbatches split it
_MANTISSA = (1 << 53) - 1


def uniform(key: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Float64 uniforms in [0, 1) of ``shape`` from a key, computed on the key's device.

    Element ``i`` (row-major) is the top 53 bits of the splitmix64 hash behind
    ``rng.split(key, n)[i]``: a pure function of ``(key, i)``, no generator, no host sync.
    """
    n = 1
    for s in shape:
        n *= s
    bits = R.split(key, n)[:, 0]
    return (((bits >> 11) & _MANTISSA).to(torch.float64) * 2.0**-53).reshape(shape)


def sample_categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Labels ``y ~ softmax(logits)`` from uniforms ``u`` (shape ``logits.shape[:-1]``) by
    inverting the CDF: ``y`` is the first class whose cumulative probability exceeds ``u``.

    Runs in float64 for float64 logits, float32 otherwise; classes of probability 0 are never
    drawn. Returns int64 labels of shape ``u.shape``.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cdf = torch.softmax(logits.detach().to(dtype), dim=-1).cumsum(dim=-1)
    target = (u.to(dtype) * cdf[..., -1]).unsqueeze(-1)  # scale by the sum: rounding-proof
    y = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return y.clamp_max(logits.shape[-1] - 1)


def _make_sampled_loss(apply_fn: ApplyFn, ignore_index: int):
    """``loss(params, batch) -> (sum CE(logits, yhat), {"tokens"})`` with ``yhat`` sampled from
    the logits at the trained positions (``labels != ignore_index``) using the batch's uniforms."""

    def loss_fn(params: TensorDictBase, batch: TensorDictBase, **kw: Any):
        u = batch[_UNIFORM_KEY]
        # every position's logits: the uniforms and the labels are [B, S]; kw: frozen trees
        logits = apply_fn(params, batch.exclude(_UNIFORM_KEY, "logits_index"), **kw)
        with torch.no_grad():
            yhat = sample_categorical(logits, u)
            yhat = torch.where(batch["labels"] == ignore_index, ignore_index, yhat)
        loss_sum, tokens = token_cross_entropy(logits, yhat, ignore_index=ignore_index)
        return loss_sum, {"tokens": tokens}

    return loss_fn


def make_hessian_estimate(
    apply_fn: ApplyFn,
    *,
    microbatches: int = 1,
    host_branch: bool = False,
    ignore_index: int = IGNORE_INDEX,
    grad_sync: GradSync | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> UpdateExtra:
    """The ``update_extra`` hook of :func:`tscale.step.make_train_step` for Sophia-G:
    ``(state, batch) -> {"hessian": hhat}``, the GNB estimate ``hhat = N ghat^2`` with ``N``
    the trained tokens and ``ghat`` the mean gradient against sampled labels.

    Args:
        apply_fn: ``apply_fn(params, batch) -> logits`` (batch has ``input_ids``, ``labels``).
            Keep ``state.rng`` on the device of ``state.step`` (as the trainer does), or the
            key derivation copies the step to the host.
        microbatches: the step's microbatches (the estimate accumulates over the same parts;
            the uniforms are drawn for the whole batch first, so the estimate does not change).
        host_branch: read the optimizer's ``hessian_due`` flag on the host (one sync per step)
            and estimate only when it is due (``{"hessian": None}`` otherwise), instead of on
            every step (see the module docstring).
        ignore_index: the label of untrained positions.
        grad_sync: data parallelism (DDP): the step's reduction of summed gradients and token
            counts, applied to the estimate's before the division, so it is the estimate of the
            global batch.
        rank, world_size: this rank's share of the global batch (contiguous rows): its uniforms
            are those of its rows in the global batch, so the estimate equals one process's.
    """
    sampled_loss_fn = _make_sampled_loss(apply_fn, ignore_index)

    def estimate(state: TrainState, batch: TensorDictBase) -> dict[str, Any]:
        # host_branch: bool(due) is the one host sync of this mode
        if host_branch and not bool(hessian_due(state.opt_state)):
            return {"hessian": None}
        key = R.fold_in(state.rng, state.step)
        hbatch = batch.clone(recurse=False)
        labels = batch["labels"]
        rows, width = labels.shape
        u = uniform(key, (rows * world_size, width))[rank * rows : (rank + 1) * rows]
        hbatch.set(_UNIFORM_KEY, u.to(labels.device))
        parts = split_microbatches(hbatch, microbatches)
        frozen = {"frozen": state.frozen} if state.frozen else {}  # e.g. the LoRA base
        hgrads, _, aux = accumulate(sampled_loss_fn, state.params, parts, **frozen)
        htokens = aux[NORMALISER].value
        if grad_sync is not None:  # the global batch's summed estimate and token count
            hgrads, _, htokens = grad_sync(hgrads, torch.zeros((), device=htokens.device), htokens)
        hs = T.leaves(hgrads)
        if hs:
            # bfloat16/float16 gradients square in float32, the dtype of the Hessian EMA.
            if any(h.dtype not in (torch.float32, torch.float64) for h in hs):
                hgrads = hgrads.apply(
                    lambda h: h if h.dtype in (torch.float32, torch.float64) else h.float()
                )
                hs = T.leaves(hgrads)
            # N * (sum_grad / N)^2 = sum_grad^2 / N
            torch._foreach_mul_(hs, hs)
            torch._foreach_div_(hs, htokens.clamp_min(1).to(hs[0].dtype))
        return {"hessian": hgrads}

    return estimate
