"""Reward modelling: a scalar head on the decoder trained with the Bradley–Terry loss on pairs.

The batches are the preference layout (``docs/preference.md``): each group is one document, its
chosen completion on branch 1 and its rejected one on branch 2, several groups per packed row.
The model is :class:`~tscale.models.reward.RewardModel` around the run's decoder (or its LoRA
stack: the adapters and ``score.weight`` train); a sequence's reward is its score at its last
token (:func:`tscale.models.reward.sequence_ends`). The loss per pair is
:func:`tscale.losses.preference.bradley_terry_loss`: ``−log σ(r_w − r_l − m)`` plus
``c (r_w + r_l)²`` (TRL's ``RewardTrainer``), summed over the valid pairs of the batch; the
step divides by the global number of pairs, so the objective is TRL's mean over pairs.

The margin ``m``: the pair's own when the data has a ``margin`` column (Llama 2's rating-based
margin, TRL's column: :func:`tscale.data.preference.record_margin` checks it, a bad one is
quarantined), else ``task.margin``; either way carried to the batch as the per-token
``margins`` field (one value over the pair's document, read at the chosen sequence's end). The
two do not add up: a run with both is refused (one line), as TRL has the column only.

Metrics, as TRL's ``RewardTrainer`` names them, as weighted means over pairs (exact under
microbatches and ranks): ``accuracy`` (``r_w > r_l``), ``margin`` (``r_w − r_l``),
``rewards/chosen``, ``rewards/rejected``, ``mean_reward`` (over both sides); ``min_reward`` and
``max_reward`` reduce by min/max.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from tensordict import TensorDictBase

from tscale.core import metrics as M
from tscale.core import tree as T
from tscale.core.fields import field
from tscale.core.result import Ok
from tscale.data.loader import MARGINS, batch_iter
from tscale.data.preference import MARGIN, preference_examples
from tscale.errors import DataError, ShapeError
from tscale.losses.preference import bradley_terry_loss
from tscale.models.protocol import frozen_kw
from tscale.models.reward import (
    SCORE,
    RewardHead,
    RewardModel,
    gather_at,
    sequence_ends,
    without_logits_index,
)
from tscale.models.transformer import TransformerConfig
from tscale.tasks.base import LossFn, TaskContext, register_task
from tscale.tasks.preference import PreferenceTask, group_stage

__all__ = [
    "CHOSEN",
    "REJECTED",
    "RewardTask",
    "evaluate_pairs",
    "make_reward_loss",
    "pair_margins",
    "pair_rewards",
    "reward_metrics",
    "split_score",
]

CHOSEN, REJECTED = 1, 2
"""The branch ids of a pair's chosen and rejected completions (the group layout's)."""
_BOTH_MARGINS = (
    "{where}: the data has a margin column (each pair's margin) and task.margin is {margin}; "
    "they do not add up: set task.margin: 0 to use the column, or drop the column"
)


def pair_rewards(
    scores: torch.Tensor, batch: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen and rejected rewards of every group of a group-layout batch.

    Args:
        scores: per-token scores [B, S, 1] (``RewardModel.apply``) or [B, S].
        batch: ``doc_ids`` and ``branch_ids`` [B, S].

    Returns:
        ``(chosen, rejected, valid)``, each [B, S] indexed ``[row, doc - 1]``; ``valid`` is True
        where the document has both a chosen and a rejected sequence. Scores in float32 at
        least (float64 stays float64).

    Raises:
        ShapeError: the scores have more than one label.
    """
    if scores.dim() == 3:
        if scores.shape[-1] != 1:
            raise ShapeError(
                f"a reward model has one score per token; got {scores.shape[-1]} labels"
            )
        scores = scores[..., 0]
    positions, valid = sequence_ends(batch, num_branches=REJECTED)
    seq = gather_at(scores, positions)
    seq = seq if seq.dtype == torch.float64 else seq.float()
    return seq[..., CHOSEN - 1], seq[..., REJECTED - 1], valid.all(-1)


def pair_margins(batch: Any, like: torch.Tensor) -> torch.Tensor | None:
    """Each group's margin [B, S] (indexed as :func:`pair_rewards`' outputs, in ``like``'s dtype
    and device) from the batch's per-token ``margins``, read at the chosen sequence's end; None
    when the batch has none (the data has no margin column)."""
    margins = batch.get(MARGINS, None)
    if margins is None:
        return None
    positions, _ = sequence_ends(batch, num_branches=REJECTED)
    return gather_at(margins, positions[..., CHOSEN - 1]).to(like.dtype)


def make_reward_loss(
    apply_fn: Callable[..., torch.Tensor],
    *,
    margin: float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> LossFn:
    """``loss_fn(params, batch, *, frozen=None) -> (loss_sum, aux)``: the Bradley–Terry loss of
    the pairs of a group-layout batch (see the module docstring) over ``apply_fn``'s per-token
    scores (``RewardModel.apply``, wrapped or not); ``aux["tokens"]`` is the number of pairs.
    Each pair's margin is the batch's ``margins`` (:func:`pair_margins`) when it has them (the
    reward task's batches always do: the column's values, or ``task.margin``), else ``margin``.
    """

    def loss_fn(
        params: TensorDictBase, batch: Any, *, frozen: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        scores = apply_fn(params, without_logits_index(batch), **frozen_kw(frozen))
        chosen, rejected, valid = pair_rewards(scores, batch)
        m = pair_margins(batch, chosen)
        if m is None and margin:
            m = torch.tensor(margin, dtype=chosen.dtype, device=chosen.device)
        losses = bradley_terry_loss(
            chosen, rejected, margin=m, center_rewards_coefficient=center_rewards_coefficient
        )
        loss_sum = torch.where(valid, losses, 0.0).sum()
        return loss_sum, reward_metrics(chosen.detach(), rejected.detach(), valid)

    return loss_fn


def reward_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, valid: torch.Tensor
) -> dict[str, Any]:
    """``aux`` of the reward loss: ``tokens`` (the number of valid pairs) and TRL's metrics
    over the valid pairs (see the module docstring); no host sync."""
    n = valid.sum()

    def over_pairs(values: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, values, 0.0).sum()

    both = torch.stack([chosen, rejected], -1)
    pair = valid[..., None].expand_as(both)
    inf = torch.tensor(float("inf"), dtype=both.dtype, device=both.device)
    return {
        M.NORMALISER: n,
        "accuracy": M.mean(over_pairs((chosen > rejected).to(chosen.dtype)), n),
        "margin": M.mean(over_pairs(chosen - rejected), n),
        "rewards/chosen": M.mean(over_pairs(chosen), n),
        "rewards/rejected": M.mean(over_pairs(rejected), n),
        "mean_reward": M.mean(over_pairs(chosen + rejected), 2 * n),
        "min_reward": M.minimum(torch.where(pair, both, inf).min()),
        "max_reward": M.maximum(torch.where(pair, both, -inf).max()),
    }


def split_score(params: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
    """``(decoder params, {"score": ...})``: a reward model's params split so that LoRA builds
    its base from the decoder alone; :func:`tscale.core.tree.combine` joins the adapters and
    the head again."""
    flat = T.flatten(params)
    head = {k: v for k, v in flat.items() if k.split(".", 1)[0] == SCORE}
    rest = {k: v for k, v in flat.items() if k.split(".", 1)[0] != SCORE}
    return T.unflatten(rest), T.unflatten(head)


@register_task
@attrs.frozen(kw_only=True)
class RewardTask(PreferenceTask):
    """A reward model trained on chosen/rejected pairs (Bradley–Terry).

    The data stage and layout are the preference tasks' (``share_prompt``,
    ``max_prompt_length``, ``max_completion_length``); the model is the run's decoder with a
    ``score`` head instead of its LM head (:attr:`head`), no reference model.
    """

    type: Literal["reward"] = field("reward", "The objective: a reward model on preference pairs.")
    margin: float = field(
        0.0,
        "The margin m the chosen reward must beat the rejected one by: the loss is "
        "-log sigmoid(r_chosen - r_rejected - m) (Llama 2's), one value for every pair. Data "
        "with a margin column gives each pair its own (TRL's) and needs 0 here. 0: none.",
        ge=0.0,
    )
    center_rewards_coefficient: float | None = field(
        None,
        "Weight c of c * (r_chosen + r_rejected)^2, which centres the rewards on zero "
        "(Eisenstein et al. 2023; TRL suggests 0.01). null: off.",
        ge=0.0,
    )

    key_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "margin")
    head: ClassVar[str] = "score"
    """The model's head: ``"score"`` (a :class:`~tscale.models.reward.RewardModel`); the run
    builds the decoder without ``lm_head`` and wraps it with :meth:`wrap_model`."""

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        """The preference stage with the records' ``margin`` column read (a bad margin is
        quarantined) and carried as the documents' ``margins``; a record without the column
        gets ``task.margin`` (so every document has one, whichever files it mixes).

        Raises (at call time):
            DataError: a record has a margin and ``task.margin`` is set (one line naming it).
        """
        inner = preference_examples(
            cfg.data,
            encoder,
            template,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            margins=True,
        )

        def with_margins(records: Sequence[Any], places: Sequence[str], **kw: Any) -> Any:
            results, report = inner(records, places, **kw)
            default = {MARGIN: self.margin}
            return [Ok({**default, **r.value}) if isinstance(r, Ok) else r for r in results], report

        stage = group_stage(with_margins, share_prompt=self.share_prompt, bos_id=encoder.bos_id)
        if not self.margin:
            return stage

        def refusing(records: Sequence[Any], places: Sequence[str], **kw: Any) -> Any:
            for record, where in zip(records, places, strict=True):
                if MARGIN in record:
                    raise DataError(_BOTH_MARGINS.format(margin=self.margin, where=where))
            return stage(records, places, **kw)

        return refusing

    def loss(self, ctx: TaskContext) -> LossFn:
        """The Bradley–Terry loss over ``ctx.apply_fn`` (the reward model's per-token scores)."""
        return make_reward_loss(
            ctx.apply_fn,
            margin=self.margin,
            center_rewards_coefficient=self.center_rewards_coefficient,
        )

    def wrap_model(
        self, model: Any, config: TransformerConfig, *, pad_id: int | None
    ) -> RewardModel:
        """The reward model around the run's stacked model (the decoder, or its LoRA stack);
        ``pad_id`` is the tokenizer's pad, for HF's last-token rule on plain rows."""
        return RewardModel(model, RewardHead.of(config, pad_id=pad_id))

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Held-out loss and the pair metrics over the eval examples (group documents); a
        reward model generates nothing."""
        bundle = ctx.data
        if not bundle.eval_examples:
            return {}, []
        batches = (
            ctx.prepare_batch(batch).to(ctx.device)
            for batch in batch_iter(
                bundle.eval_examples, ctx.config.eval.batch_size, bundle.encoder.pad_id
            )
        )
        return evaluate_pairs(self.loss(ctx), params, batches, frozen=frozen), []

    def has_eval(self, data: Any, config: Any) -> bool:
        """Held-out pairs."""
        return bool(data.eval_examples)


def evaluate_pairs(
    loss_fn: LossFn,
    params: TensorDictBase,
    batches: Iterable[Any],
    *,
    frozen: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """``loss`` (the mean over all pairs) and the reward metrics of ``loss_fn`` over
    ``batches``, reduced as in training (weighted means over pairs), without gradients."""
    total: dict[str, Any] | None = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with torch.no_grad():
            s, aux = loss_fn(params, batch, **frozen_kw(frozen))
        loss_sum += s.double().cpu()
        total = dict(aux) if total is None else M.combine(total, aux)
    if total is None:
        return {}
    out = {k: float(v) for k, v in M.finalise(total).items()}
    pairs = out.pop(M.NORMALISER)
    out["loss"] = float(loss_sum) / max(pairs, 1.0)
    return out
