"""Preference optimisation from pairs: DPO (and its loss types), SimPO, CPO and ORPO.

One data stage and one loss skeleton serve every method; a method is a record with its
hyper-parameters and one function from per-pair log-probs to per-pair losses
(:mod:`tscale.losses.preference`):

- examples: preference records (prompt/chosen/rejected as strings or chat messages, implicit
  prompts) → token ids (:func:`tscale.data.preference.preference_examples`) → one *group
  document* per pair (:func:`tscale.data.groups.group_document`): with ``task.share_prompt`` the
  prompt once and both completions after it, isolated from each other by ``branch_ids``
  (branch 1 = chosen, 2 = rejected); several pairs per row with ``data.packing``.
- loss: the policy's (and, for methods with one, the reference model's) summed log-probs of
  every completion (:func:`tscale.losses.sequence.sequence_logps`), the method's per-pair
  losses, summed over the pairs present; the normaliser is the number of pairs, so microbatches
  and ranks never change the gradient. Metrics as TRL names them (``rewards/chosen`` …).
- reference (:mod:`tscale.tasks.reference`): ``auto`` is the LoRA base with LoRA (no copy)
  and a frozen copy of the starting weights otherwise; ``reference_path`` another HF folder;
  ``precomputed`` runs the reference once before the first step (its per-token log-probs
  become the rows' ``ref_logps`` field, cached beside the processed data) and keeps no model.
  The reference forward never builds a graph.
- evaluate: the same metrics over the held-out pairs, and exact match of greedy answers
  against the chosen completion.
"""

# ruff: noqa: RUF009 - `field` returns an attrs field (a default declaration), not a shared value
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from tensordict import TensorDictBase

from tscale.core import metrics as M
from tscale.core.fields import field
from tscale.core.result import Err, Ok
from tscale.core.state import TrainState
from tscale.data.groups import group_document, single_document_row
from tscale.data.length import LengthReport
from tscale.data.loader import MARGINS, batch_iter
from tscale.data.preference import (
    MARGIN,
    PreferenceLimits,
    fit_preference,
    preference_examples,
)
from tscale.errors import ConfigError
from tscale.losses import preference as P
from tscale.losses.sequence import PairView, pair_view, sequence_logps
from tscale.models.protocol import frozen_kw
from tscale.tasks.base import (
    FrozenTree,
    LossFn,
    RolloutFn,
    TaskContext,
    TaskDefaults,
    register_task,
)
from tscale.tasks.reference import (
    REFERENCE,
    STREAMING_REFUSAL,
    attach_reference_logps,
    folder_reference,
    frozen_copy,
    lora_base_reference,
    precomputed_sums,
    reference_apply,
    whole_tree,
)
from tscale.tasks.sft import evaluate_lm

__all__ = [
    "CPOTask",
    "DPOTask",
    "ORPOTask",
    "PairLogps",
    "PreferenceTask",
    "SimPOTask",
    "fit_document",
    "group_stage",
    "pair_logps",
    "sft_view",
]

Reference = Literal["auto", "copy", "lora_base", "precomputed", "none"]


PairLogps = PairView
"""Per-pair summed completion log-probs and token counts, flattened over (row, document);
``valid`` marks the slots that hold a pair (both completions present)."""


def pair_logps(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> PairLogps:
    """The pairs of a group batch: branch 1 (chosen) and 2 (rejected) of each document."""
    return pair_view(sequence_logps(logits, batch))


def _safe(p: PairLogps) -> PairLogps:
    """Empty slots with one token, so length-normalised terms stay finite where they are
    masked out (``torch.where`` keeps their NaN-free zeros out of the sum and the gradient)."""
    one = torch.ones_like(p.chosen_tokens)
    return p._replace(
        chosen_tokens=torch.where(p.valid, p.chosen_tokens, one),
        rejected_tokens=torch.where(p.valid, p.rejected_tokens, one),
    )


def sft_view(p: PairLogps) -> torch.Tensor:
    """Per-pair NLL of the chosen completion, length-averaged: ``−log π(y_w) / |y_w|``.

    TRL takes this term as a token mean over its (local) batch; the per-pair form is
    independent of how a batch is split into microbatches and ranks, and equal to TRL's when
    the chosen completions have one length."""
    return -p.chosen / p.chosen_tokens.to(p.chosen.dtype)


@attrs.frozen(kw_only=True)
class PreferenceTask(TaskDefaults):
    """What every pairwise method shares: the data stage, the layout, the reference model, the
    loss skeleton, the metrics and the evaluation. A method sets :attr:`uses_reference` and
    implements :meth:`pair_loss`."""

    share_prompt: bool = field(
        True,
        "Pack each pair's prompt once with both completions after it (a block mask keeps them "
        "apart); false: the prompt repeated before each completion.",
    )
    max_prompt_length: int | None = field(
        None, "Prompt tokens kept (cut from the left); null: no limit.", ge=1
    )
    max_completion_length: int | None = field(
        None, "Tokens kept of each completion (cut from the right); null: no limit.", ge=1
    )

    key_metrics: ClassVar[tuple[str, ...]] = ("rewards/accuracies", "rewards/margins")
    uses_reference: ClassVar[bool] = False
    precomputes_reference: ClassVar[bool] = False
    """Whether the method reads ``task.reference: precomputed`` (its loss sums the rows'
    ``ref_logps``)."""

    # ---------------------------------------------------------------- the method

    def pair_loss(self, policy: PairLogps, reference: PairLogps | None) -> P.PairLoss:
        """Per-pair losses and rewards of this method (all slots; the caller masks)."""
        raise NotImplementedError

    def reference_strategy(self, ctx: TaskContext) -> str:
        """``copy``, ``lora_base``, ``precomputed`` or ``none`` for this run."""
        return "none"

    # ---------------------------------------------------------------- the task contract

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        """Preference records → token ids → one group document per pair (see
        :func:`group_stage`)."""
        inner = preference_examples(
            cfg.data,
            encoder,
            template,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            unpaired=False,
        )
        return group_stage(inner, share_prompt=self.share_prompt, bos_id=encoder.bos_id)

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        """The reference model's frozen tree, when the method has one and it is a copy; with
        ``precomputed`` its log-probs attached to every row instead (no tree)."""
        strategy = self.reference_strategy(ctx)
        folder = getattr(self, "reference_path", None)
        if strategy == "copy":
            return frozen_copy(ctx) if folder is None else folder_reference(ctx, folder)
        if strategy == "lora_base":
            return lora_base_reference(ctx)
        if strategy == "precomputed":
            attach_reference_logps(ctx, folder)
        return {}

    def loss(self, ctx: TaskContext) -> LossFn:
        """``loss_fn(params, batch, frozen=...)``: the method's pair losses summed over the
        pairs present; ``tokens`` (the normaliser) is the number of pairs."""
        apply_fn = ctx.apply_fn
        strategy = self.reference_strategy(ctx)
        ref = reference_apply(ctx) if strategy in ("copy", "lora_base") else None
        precomputed = strategy == "precomputed"

        def loss_fn(
            params: TensorDictBase,
            batch: Mapping[str, torch.Tensor],
            *,
            frozen: Mapping[str, Any] | None = None,
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            policy = _safe(pair_logps(apply_fn(params, batch, **frozen_kw(frozen)), batch))
            reference = None
            if ref is not None:
                reference = _safe(pair_logps(ref(batch, frozen or {}), batch))
            elif precomputed:  # the rows' ref_logps, summed as the policy's log-probs
                reference = _safe(pair_view(precomputed_sums(batch)))
            out = self.pair_loss(policy, reference)
            zero = torch.zeros((), dtype=out.losses.dtype, device=out.losses.device)
            loss_sum = torch.where(policy.valid, out.losses, zero).sum()
            aux: dict[str, Any] = {"tokens": policy.valid.sum()}
            aux.update(
                P.preference_metrics(
                    out.chosen_rewards,
                    out.rejected_rewards,
                    policy.chosen,
                    policy.rejected,
                    valid=policy.valid,
                )
            )
            return loss_sum, aux

        return loss_fn

    def has_eval(self, data: Any, config: Any) -> bool:
        """Held-out pairs (their metrics) or records to generate answers for."""
        return bool(data.eval_examples) or (config.eval.num_samples > 0 and bool(data.eval_records))

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The training metrics over the held-out pairs (``loss``, ``rewards/*``, ``logps/*``)
        and exact match of greedy answers against the chosen completions."""
        bundle, ev = ctx.data, ctx.config.eval
        metrics: dict[str, float] = {}
        if bundle.eval_examples:
            loss_fn = self.loss(attrs.evolve(ctx, apply_fn=ctx.model.apply))
            totals: dict[str, Any] = {}
            with torch.no_grad():
                for batch in batch_iter(bundle.eval_examples, ev.batch_size, bundle.encoder.pad_id):
                    batch = ctx.prepare_batch(batch).to(ctx.device)
                    loss_sum, aux = loss_fn(params, batch, frozen=frozen)
                    aux = {"loss": M.mean(loss_sum, aux["tokens"]), **aux}
                    aux.pop(M.NORMALISER)
                    totals = M.combine(totals, aux) if totals else dict(aux)
            metrics.update({k: float(v) for k, v in M.finalise(totals).items()})
        answered = [r for r in (_as_sft_record(r) for r in bundle.eval_records) if r is not None]
        if ev.num_samples > 0 and answered:
            em, samples = evaluate_lm(
                ctx.model,
                params,
                attrs.evolve(bundle, eval_examples=[], eval_records=answered),
                num_samples=ev.num_samples,
                batch_size=ev.batch_size,
                max_new_tokens=ev.max_new_tokens,
                device=ctx.device,
                prepare_batch=ctx.prepare_batch,
                frozen=frozen,
            )
            metrics.update(em)
            return metrics, samples
        return metrics, []


def document_length(prompt: int, completions: Sequence[int], share_prompt: bool) -> int:
    """Tokens of a group document (:func:`tscale.data.groups.group_document`)."""
    n = len(completions)
    return prompt + sum(completions) + (n - 1 if share_prompt else (n - 1) * prompt)


def fit_document(
    example: dict, limit: int, *, share_prompt: bool, bos_id: int | None
) -> tuple[dict, bool]:
    """``example`` (prompt ids and completions) cut until its group document fits ``limit``
    tokens — the prompt from the left first, then the completions from the right
    (:func:`tscale.data.preference.fit_preference` with the largest prompt + longest-completion
    limit that fits) — and whether it was cut. A completion may come back empty."""
    prompt, completions = example["prompt_ids"], example["completions"]
    if document_length(len(prompt), [len(c) for c in completions], share_prompt) <= limit:
        return example, False
    names = [str(i) for i in range(len(completions))]

    def fitted(total: int) -> tuple[list[int], list[list[int]]]:
        p, cs, _ = fit_preference(
            prompt, completions, names, PreferenceLimits(max_length=total), bos_id=bos_id
        )
        return p, cs

    lo, hi = 1, len(prompt) + max(map(len, completions))  # the largest total that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p, cs = fitted(mid)
        if document_length(len(p), [len(c) for c in cs], share_prompt) <= limit:
            lo = mid
        else:
            hi = mid - 1
    p, cs = fitted(lo)
    return {**example, "prompt_ids": p, "completions": cs}, True


def group_stage(
    inner: Callable[..., tuple[list[Any], Any]],
    *,
    share_prompt: bool,
    bos_id: int | None,
    extend: Callable[[list[Any]], list[Any]] | None = None,
) -> Callable[..., tuple[list[Any], Any]]:
    """The preference data stage (records → prompt and completion ids) followed by the group
    layout: each example becomes one group document (doc_ids 1; the packer renumbers them).

    The task's ``max_prompt_length``/``max_completion_length`` apply in ``inner``; the data
    section's token limit (``data.max_length``, ``data.length.max_total_length``) caps the
    whole document — one packed or padded row — so a shared-prompt pair fits
    ``P + C_w + C_l + 1`` tokens in it and a separate one ``2P + C_w + C_l``. ``extend``
    may add completions to the examples first (KTO's mismatched KL completion). An example's
    ``margin`` (the reward task's) becomes the document's per-token ``margins`` field, one
    value over all its tokens."""

    def stage(
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: Any,
        max_length: int | None,
    ) -> tuple[list[Any], Any]:
        results, report = inner(records, places, budget=None, max_length=None)
        if extend is not None:
            results = extend(results)
        limits = [n for n in (max_length, getattr(budget, "max_total_length", None)) if n]
        limit = min(limits) if limits else None
        out: list[Any] = []
        cut = 0
        for r, where in zip(results, places, strict=True):
            if not isinstance(r, Ok):
                out.append(r)
                continue
            ex = r.value
            if limit is not None:
                ex, was_cut = fit_document(ex, limit, share_prompt=share_prompt, bos_id=bos_id)
                cut += was_cut
                if not all(ex["completions"]):
                    out.append(
                        Err(
                            f"a completion is empty after fitting the pair into {limit} tokens "
                            "(data.max_length): raise it or set task.max_prompt_length",
                            None,
                            where,
                        )
                    )
                    continue
            doc = group_document(
                ex["prompt_ids"], ex["completions"], ex["branches"], share_prompt=share_prompt
            )
            if MARGIN in ex:  # the reward task's per-pair margin, over the document's tokens
                doc[MARGINS] = [ex[MARGIN]] * len(doc["input_ids"])
            out.append(Ok(single_document_row(doc)))
        if cut:
            report = report + LengthReport(truncated={"document": {"max_length": cut}})
        return out, report

    return stage


def _as_sft_record(record: dict) -> dict | None:
    """A preference record as the SFT record whose answer is the chosen completion (for exact
    match): ``prompt``/``completion`` strings, or the conversation ending with the chosen
    reply (a desirable KTO completion counts as chosen); None when it has none."""
    chosen = record.get("chosen")
    if chosen is None and record.get("label") is True:  # a desirable unpaired completion
        chosen = record.get("completion")
    if chosen is None:
        return None
    prompt = record.get("prompt")
    extra = {k: record[k] for k in ("task",) if k in record}
    if isinstance(chosen, str):
        return {"prompt": "" if prompt is None else str(prompt), "completion": chosen, **extra}
    if isinstance(chosen, list):
        lead = prompt if isinstance(prompt, list) else []
        return {"messages": [*lead, *chosen], **extra}
    return None


def _reference_for(task: PreferenceTask, ctx: TaskContext, reference: str) -> str:
    """Resolve ``task.reference``: ``auto`` → the LoRA base with LoRA, else a copy
    (``precomputed`` runs the LoRA base with LoRA, else the starting weights)."""
    lora = "base" in ctx.frozen
    folder = getattr(task, "reference_path", None)
    if folder is not None:  # another folder's weights: a copy of them, or their log-probs once
        if reference in ("lora_base", "none"):
            raise ConfigError(
                f"task.reference_path: {folder} is a reference model, but task.reference "
                f"{reference} uses {'the LoRA base' if reference == 'lora_base' else 'none'}; "
                "set task.reference: copy (or auto, or precomputed), or remove task.reference_path"
            )
        if reference == "auto":
            return "copy"
    if reference == "precomputed" and not task.precomputes_reference:
        raise ConfigError(
            f"task.reference: precomputed is not supported by task.type {task.type} yet; use "
            "auto, copy or lora_base"
        )
    if reference == "auto":
        return "lora_base" if lora else "copy"
    if reference == "copy" and lora and folder is None:
        raise ConfigError(
            f"task.reference: copy with lora.enabled copies only the adapters; use lora_base "
            f"(the base is the starting model, no copy) or auto ({task.type})"
        )
    if reference == "lora_base" and not lora:
        raise ConfigError("task.reference: lora_base needs lora.enabled; use copy or auto")
    return reference


# -------------------------------------------------------------------------------- the methods


@register_task
@attrs.frozen(kw_only=True)
class DPOTask(PreferenceTask):
    """Direct Preference Optimization and its loss types (TRL's DPOTrainer options)."""

    type: Literal["dpo"] = field("dpo", "Direct Preference Optimization.")
    beta: float = field(0.1, "β: the strength of the KL constraint to the reference.", gt=0.0)
    loss_type: list[str] = field(
        ["sigmoid"],
        "DPO loss types (several: their weighted sum, e.g. [sigmoid, bco_pair, sft] for MPO); "
        "see docs/preference.md.",
    )
    loss_weights: list[float] | None = field(None, "One weight per loss_type (null: 1 each).")
    label_smoothing: float = field(
        0.0,
        "ε of robust (the flip probability) and exo_pair (> 0; the paper: 1e-3); no other "
        "loss type reads it (TRL 1.16's sigmoid has no label smoothing).",
        ge=0.0,
        lt=0.5,
    )
    reference: Reference = field(
        "auto",
        "The reference model: auto (the LoRA base with LoRA, else a copy of the starting "
        "weights), copy, lora_base, precomputed (its log-probs computed once before training "
        "and cached with the processed data; no model kept), or none (log π_ref = 0).",
    )
    reference_path: str | None = field(
        None,
        "An HF folder whose weights are the reference instead of the starting weights (the "
        "policy's architecture and vocabulary, e.g. the SFT model when the policy starts from "
        "a later checkpoint); with reference auto/copy (LoRA too) or precomputed.",
    )
    discopop_tau: float = field(0.05, "τ of the discopop loss type.", gt=0.0)
    sync_ref_model: bool = field(
        False,
        "TR-DPO: every ref_model_sync_steps steps move the reference toward the policy "
        "(needs reference copy; the reference is then saved in every checkpoint).",
    )
    ref_model_sync_steps: int = field(512, "TR-DPO: steps between reference updates.", ge=1)
    ref_model_mixup_alpha: float = field(
        0.6, "TR-DPO: α in ref ← α·policy + (1 − α)·ref.", ge=0.0, le=1.0
    )

    uses_reference: ClassVar[bool] = True
    precomputes_reference: ClassVar[bool] = True

    def check(self, config: Any) -> None:
        """``loss_type`` names, no batch-coupled type, one weight per type."""
        unknown = [t for t in self.loss_type if t not in P.DPO_LOSS_TYPES]
        if unknown:
            trained = [t for t in P.DPO_LOSS_TYPES if not t.startswith("aot")]
            close = difflib.get_close_matches(unknown[0], trained, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"task.loss_type: unknown {unknown[0]!r}{hint} (known: {', '.join(trained)})"
            )
        coupled = [t for t in self.loss_type if t.startswith("aot")]
        if coupled:
            raise ConfigError(
                f"task.loss_type: {coupled[0]} sorts the whole batch (a split into microbatches "
                "or ranks changes it); tscale trains the pair-separable types"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"task.loss_weights: {len(self.loss_weights)} weights for "
                f"{len(self.loss_type)} loss types; give one per loss_type"
            )
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ConfigError("task.label_smoothing: exo_pair needs ε > 0 (the paper: 1e-3)")
        if self.label_smoothing and not {"robust", "exo_pair"} & set(self.loss_type):
            raise ConfigError(
                f"task.label_smoothing: {self.label_smoothing} is read by robust and exo_pair "
                f"only; loss_type {self.loss_type} ignores it (set it to 0)"
            )

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        if self.reference == "precomputed" and cfg.data.streaming:
            raise ConfigError(STREAMING_REFUSAL)
        return super().examples(cfg, encoder, template)

    def reference_strategy(self, ctx: TaskContext) -> str:
        strategy = _reference_for(self, ctx, self.reference)
        if self.sync_ref_model and "base" in ctx.frozen:
            raise ConfigError(
                "task.sync_ref_model: TR-DPO moves the reference toward the policy's weights, "
                "but with lora.enabled the policy trains adapters only; set lora.enabled: false "
                "or task.sync_ref_model: false"
            )
        if self.sync_ref_model and strategy != "copy":
            raise ConfigError(
                f"task.sync_ref_model: TR-DPO updates a copy of the reference; task.reference "
                f"resolves to {strategy} here (LoRA shares its base with the policy)"
            )
        return strategy

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        trees = super().prepare(ctx)
        if self.sync_ref_model:  # it changes: checkpoints hold the tree, not the folder
            return {k: FrozenTree(v.tree, None) for k, v in trees.items()}
        return trees

    def rollout(self, ctx: TaskContext) -> RolloutFn | None:
        """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656, "soft update"): after every
        ``ref_model_sync_steps`` optimizer steps, ``ref ← α·policy + (1 − α)·ref`` in place,
        before the next step (TRL's timing)."""
        if not self.sync_ref_model:
            return None
        every, alpha = self.ref_model_sync_steps, self.ref_model_mixup_alpha

        def sync(state: TrainState, batch: TensorDictBase, key: torch.Tensor) -> TensorDictBase:
            step = int(state.step)  # one host read per batch, only with sync_ref_model
            if step > 0 and step % every == 0:
                ref = state.frozen[REFERENCE]
                with torch.no_grad():  # FSDP: the shards gathered whole (ref is replicated)
                    for name, value in whole_tree(state.params).items(True, True):
                        ref[name].lerp_(value.to(ref[name].dtype), alpha)
            return batch

        return sync

    def pair_loss(self, policy: PairLogps, reference: PairLogps | None) -> P.PairLoss:
        weights = self.loss_weights or [1.0] * len(self.loss_type)
        ref = reference or policy._replace(
            chosen=torch.zeros_like(policy.chosen), rejected=torch.zeros_like(policy.rejected)
        )
        paired = [(t, w) for t, w in zip(self.loss_type, weights, strict=True) if t != "sft"]
        losses = torch.zeros_like(policy.chosen)
        out = None
        if paired:
            out = P.dpo_loss(
                policy.chosen,
                policy.rejected,
                ref.chosen,
                ref.rejected,
                beta=self.beta,
                loss_type=[t for t, _ in paired],
                loss_weights=[w for _, w in paired],
                label_smoothing=self.label_smoothing,
                chosen_tokens=policy.chosen_tokens,
                rejected_tokens=policy.rejected_tokens,
                discopop_tau=self.discopop_tau,
            )
            losses = out.losses
        for t, w in zip(self.loss_type, weights, strict=True):
            if t == "sft":  # per pair, length-averaged (see sft_view)
                losses = losses + w * sft_view(policy)
        if out is None:  # sft alone: TRL's rewards are still β·log-ratios
            chosen_r = (self.beta * (policy.chosen - ref.chosen)).detach()
            rejected_r = (self.beta * (policy.rejected - ref.rejected)).detach()
            return P.PairLoss(losses, chosen_r, rejected_r)
        return P.PairLoss(losses, out.chosen_rewards, out.rejected_rewards)


@register_task
@attrs.frozen(kw_only=True)
class SimPOTask(PreferenceTask):
    """SimPO: reference-free, length-normalised (β, γ)."""

    type: Literal["simpo"] = field("simpo", "Simple Preference Optimization (no reference).")
    beta: float = field(2.0, "β: the reward scale.", gt=0.0)
    gamma: float = field(0.5, "γ: the target reward margin.", ge=0.0)
    label_smoothing: float = field(0.0, "ε of the smoothed logistic loss.", ge=0.0, lt=0.5)
    sft_weight: float = field(
        0.0, "Weight of the chosen completion's length-averaged NLL (0: off).", ge=0.0
    )

    def pair_loss(self, policy: PairLogps, reference: PairLogps | None) -> P.PairLoss:
        out = P.simpo_loss(
            policy.chosen,
            policy.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
        )
        if self.sft_weight:
            return out._replace(losses=out.losses + self.sft_weight * sft_view(policy))
        return out


@register_task
@attrs.frozen(kw_only=True)
class CPOTask(PreferenceTask):
    """CPO: the preference term without a reference plus the chosen completion's NLL."""

    type: Literal["cpo"] = field("cpo", "Contrastive Preference Optimization (no reference).")
    beta: float = field(0.1, "β: the reward scale.", gt=0.0)
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = field(
        "sigmoid", "The preference term (simpo: length-averaged with γ)."
    )
    cpo_alpha: float = field(1.0, "Weight of the NLL term.", ge=0.0)
    simpo_gamma: float = field(0.5, "γ of loss_type simpo.", ge=0.0)
    label_smoothing: float = field(0.0, "ε of the smoothed logistic loss.", ge=0.0, lt=0.5)

    def pair_loss(self, policy: PairLogps, reference: PairLogps | None) -> P.PairLoss:
        out = P.cpo_loss(
            policy.chosen,
            policy.rejected,
            chosen_tokens=policy.chosen_tokens,
            rejected_tokens=policy.rejected_tokens,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            cpo_alpha=0.0,
            simpo_gamma=self.simpo_gamma,
        )
        return out._replace(losses=out.losses + self.cpo_alpha * sft_view(policy))


@register_task
@attrs.frozen(kw_only=True)
class ORPOTask(PreferenceTask):
    """ORPO: the chosen completion's NLL plus λ times the log odds-ratio term (no reference)."""

    type: Literal["orpo"] = field("orpo", "Odds Ratio Preference Optimization (no reference).")
    beta: float = field(0.1, "λ: the weight of the odds-ratio term.", gt=0.0)

    def pair_loss(self, policy: PairLogps, reference: PairLogps | None) -> P.PairLoss:
        out = P.orpo_loss(
            policy.chosen,
            policy.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            beta=self.beta,
            nll_logps=torch.zeros_like(policy.chosen),
            nll_tokens=torch.ones_like(policy.chosen_tokens),
        )  # the NLL term per pair, length-averaged (sft_view), not TRL's batch token mean
        return out._replace(losses=out.losses + sft_view(policy))
