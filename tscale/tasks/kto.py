"""KTO: Kahneman–Tversky Optimization from completions labelled desirable or undesirable.

Data: unpaired rows (prompt, completion, label) and, as TRL allows, pairs (the chosen reply is
a desirable completion, the rejected one an undesirable completion). Each row becomes one group
document (:mod:`tscale.data.groups`): the prompt, its completion(s) — branch 1 desirable,
branch 2 undesirable — and branch 3, a *mismatched* completion (the next row's) for the KL
reference point ``z₀`` (Ethayarajh et al. 2024, §4.1).

``z₀`` is taken over the **global batch** before its updates: the task's rollout stage runs the
policy and the reference over the whole batch without a graph, sums ``log π(y') − log π_ref(y')``
and the number of KL completions over this rank's rows, all-reduces both sums over the ranks,
and puts ``z₀ = max(0, Σ / n)`` into the batch (``kto_kl``, one value per row). Every microbatch
and rank then uses the same ``z₀``, so a split never changes it (a test checks). TRL computes it
per device batch and gathers across processes; with gradient accumulation each micro-step has
its own.
"""

# ruff: noqa: RUF009 - `field` returns an attrs field (a default declaration), not a shared value
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
import torch.distributed as dist
from tensordict import TensorDictBase

from tscale.core import metrics as M
from tscale.core.fields import field
from tscale.core.result import Ok
from tscale.core.state import TrainState
from tscale.data.length import LengthReport
from tscale.data.preference import preference_examples, preference_kind
from tscale.errors import ConfigError
from tscale.losses import preference as P
from tscale.losses.sequence import sequence_logps
from tscale.models.protocol import frozen_kw
from tscale.tasks.base import FrozenTree, LossFn, RolloutFn, TaskContext, register_task
from tscale.tasks.preference import PreferenceTask, Reference, _reference_for, group_stage
from tscale.tasks.reference import (
    folder_reference,
    frozen_copy,
    lora_base_reference,
    reference_apply,
    whole_tree,
)

__all__ = ["KL_BRANCH", "KTOTask", "kto_kl_batch", "with_kl_completions"]

DESIRABLE, UNDESIRABLE, KL_BRANCH = 1, 2, 3
_D, _U, _KL = DESIRABLE - 1, UNDESIRABLE - 1, KL_BRANCH - 1  # their index in sequence_logps
KL_FIELD = "kto_kl"
"""The batch field the rollout stage writes: ``z₀`` of the global batch, one value per row."""


def _completions(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Desirable and undesirable completions flattened: ``(logps, tokens, desirable, valid)``."""
    logps = torch.stack([sums[..., _D], sums[..., _U]], -1).reshape(-1)
    tokens = torch.stack([counts[..., _D], counts[..., _U]], -1).reshape(-1)
    desirable = torch.zeros_like(tokens, dtype=torch.bool).reshape(-1, 2)
    desirable[:, 0] = True
    return logps, tokens, desirable.reshape(-1), tokens > 0


def kto_kl_batch(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    *,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``z₀ = max(0, mean (log π(y') − log π_ref(y')))`` over the KL completions of ``batch``
    (and of the other ranks' rows with ``all_reduce``, a sum over ranks); 0-d, float64."""
    pol = sequence_logps(policy_logits, batch)
    ref = sequence_logps(reference_logits, batch)
    present = pol.counts[..., _KL] > 0
    diff = torch.where(present, pol.sums[..., _KL] - ref.sums[..., _KL], 0.0)
    both = torch.stack([diff.double().sum(), present.double().sum()])
    if all_reduce is not None:
        both = all_reduce(both)
    return (both[0] / both[1].clamp_min(1)).clamp_min(0)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


@register_task
@attrs.frozen(kw_only=True)
class KTOTask(PreferenceTask):
    """KTO (TRL's KTOTrainer options): unpaired desirable/undesirable completions."""

    type: Literal["kto"] = field("kto", "Kahneman–Tversky Optimization (unpaired labels).")
    beta: float = field(0.1, "β: the strength of the KL constraint to the reference.", gt=0.0)
    desirable_weight: float = field(1.0, "λ_D: weight of desirable completions.", gt=0.0)
    undesirable_weight: float = field(1.0, "λ_U: weight of undesirable completions.", gt=0.0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = field(
        "kto", "kto, or apo_zero_unpaired (no reference point)."
    )
    reference: Reference = field(
        "auto", "The reference model: auto, copy, lora_base (see task.type dpo)."
    )
    reference_path: str | None = field(
        None,
        "An HF folder whose weights are the reference instead of the starting weights (see "
        "task.type dpo); with reference auto or copy.",
    )
    sft_weight: float = field(
        0.0,
        "Weight of each desirable completion's length-averaged NLL (0: off; as task.type "
        "simpo's, an addition TRL's KTOTrainer does not have).",
        ge=0.0,
    )

    key_metrics: ClassVar[tuple[str, ...]] = ("kl", "rewards/margins")
    uses_reference: ClassVar[bool] = True

    def reference_strategy(self, ctx: TaskContext) -> str:
        if self.reference == "none":  # the loss and z₀ are log-ratios against a reference
            raise ConfigError(
                "task.reference: none is not available with task.type kto (its rewards and "
                "z0 are log-ratios to a reference); use auto, copy or lora_base"
            )
        return _reference_for(self, ctx, self.reference)

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        """Rows → token ids → one group document each, with the next row's completion as the
        mismatched KL completion (branch 3)."""
        stages = {
            kind: preference_examples(
                cfg.data,
                encoder,
                template,
                max_prompt_length=self.max_prompt_length,
                max_completion_length=self.max_completion_length,
                unpaired=kind == "unpaired",
            )
            for kind in ("paired", "unpaired")
        }
        inner = _by_kind(stages)
        return group_stage(
            inner, share_prompt=self.share_prompt, bos_id=encoder.bos_id, extend=with_kl_completions
        )

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        strategy = self.reference_strategy(ctx)
        if strategy == "copy":
            return (
                frozen_copy(ctx)
                if self.reference_path is None
                else folder_reference(ctx, self.reference_path)
            )
        return lora_base_reference(ctx)

    def rollout(self, ctx: TaskContext) -> RolloutFn | None:
        """``z₀`` of the global batch into ``batch["kto_kl"]`` (apo_zero_unpaired: none)."""
        if self.loss_type != "kto":
            return None
        apply_fn, ref = ctx.apply_fn, reference_apply(ctx)

        def stage(state: TrainState, batch: TensorDictBase, key: torch.Tensor) -> TensorDictBase:
            with torch.no_grad():  # the loop ran prepare_batch already (logits_index)
                params, frozen = (
                    whole_tree(state.params),
                    {k: whole_tree(v) for k, v in state.frozen.items()},
                )
                z0 = kto_kl_batch(
                    apply_fn(params, batch, **frozen_kw(frozen or None)),
                    ref(batch, frozen),
                    batch,
                    all_reduce=_all_reduce_sum,
                )
            out = batch.copy()
            out[KL_FIELD] = z0.to(torch.float32).expand(batch.batch_size[0]).clone()
            return out

        return stage

    def loss(self, ctx: TaskContext) -> LossFn:
        apply_fn, ref = ctx.apply_fn, reference_apply(ctx)

        def loss_fn(
            params: TensorDictBase,
            batch: Mapping[str, torch.Tensor],
            *,
            frozen: Mapping[str, Any] | None = None,
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            pol = sequence_logps(apply_fn(params, batch, **frozen_kw(frozen)), batch)
            refs = sequence_logps(ref(batch, frozen or {}), batch)
            logps, tokens, desirable, valid = _completions(pol.sums, pol.counts)
            ref_logps = _completions(refs.sums, refs.counts)[0]
            kl = batch[KL_FIELD].reshape(-1)[0] if KL_FIELD in batch else 0.0
            out = P.kto_loss(
                logps,
                ref_logps,
                desirable,
                kl,
                beta=self.beta,
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
                loss_type=self.loss_type,
            )
            zero = torch.zeros((), dtype=out.losses.dtype, device=out.losses.device)
            good, bad = valid & desirable, valid & ~desirable
            losses = out.losses
            if self.sft_weight:  # −log π(y) / |y| of the desirable completions
                nll = -logps / tokens.clamp_min(1).to(logps.dtype)
                losses = losses + self.sft_weight * torch.where(good, nll, zero)
            aux: dict[str, Any] = {
                "tokens": valid.sum(),
                "rewards/chosen": M.mean(torch.where(good, out.rewards, zero).sum(), good.sum()),
                "rewards/rejected": M.mean(torch.where(bad, out.rewards, zero).sum(), bad.sum()),
                "logps/chosen": M.mean(torch.where(good, logps, zero).sum().detach(), good.sum()),
                "logps/rejected": M.mean(torch.where(bad, logps, zero).sum().detach(), bad.sum()),
                "kl": M.mean(
                    torch.as_tensor(kl, dtype=zero.dtype).detach(),
                    torch.ones((), device=zero.device),
                ),
            }
            # the pairs present (paired rows, e.g. held-out pairs): DPO-style accuracy
            pairs = valid.reshape(-1, 2).all(-1)
            r = out.rewards.reshape(-1, 2)
            aux["rewards/accuracies"] = M.mean(
                torch.where(pairs, (r[:, 0] > r[:, 1]).to(zero.dtype), zero).sum(), pairs.sum()
            )
            aux["rewards/margins"] = M.mean(
                torch.where(pairs, r[:, 0] - r[:, 1], zero).sum(), pairs.sum()
            )
            return torch.where(valid, losses, zero).sum(), aux

        return loss_fn


def _by_kind(stages: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """One stage over unpaired rows and pairs (a pair: its chosen reply desirable, its
    rejected reply undesirable, in one document — held-out pairs for pairwise accuracy)."""

    def stage(
        records: Sequence[dict], places: Sequence[str], *, budget: Any, max_length: int | None
    ) -> tuple[list[Any], Any]:
        kinds = ["paired" if preference_kind(r) == "paired" else "unpaired" for r in records]
        out: list[Any] = [None] * len(records)
        report = LengthReport()
        for kind, fn in stages.items():
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            results, part = fn(
                [records[i] for i in idx],
                [places[i] for i in idx],
                budget=budget,
                max_length=max_length,
            )
            report = report + part
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out, report

    return stage


def with_kl_completions(results: list[Any]) -> list[Any]:
    """Each example with the next example's first completion as its mismatched KL completion
    (branch 3; cyclic over the examples of the call, deterministic)."""
    good = [i for i, r in enumerate(results) if isinstance(r, Ok)]
    out = list(results)
    for j, i in enumerate(good):
        ex = results[i].value
        mismatched = results[good[(j + 1) % len(good)]].value["completions"][0]
        out[i] = Ok(
            {
                **ex,
                "completions": [*ex["completions"], mismatched],
                "branches": [*ex["branches"], KL_BRANCH],
            }
        )
    return out
