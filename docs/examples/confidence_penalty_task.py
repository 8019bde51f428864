"""A task of your own in one module: SFT with a confidence penalty (an auxiliary loss).

The confidence penalty (Pereyra et al., "Regularizing Neural Networks by Penalizing Confident
Output Distributions", ICLR 2017 workshop) subtracts ``beta`` times the entropy of the model's
next-token distribution at each trained position from the cross-entropy, discouraging
over-confident predictions. docs/tasks.md walks through this file; tests/docs/test_task_guide.py
trains it from YAML:

    task:
      type: confidence_penalty_task:ConfidencePenaltySFT
      beta: 0.1
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from tscale.core.fields import field
from tscale.core.metrics import mean
from tscale.losses.lm import IGNORE_INDEX, target_labels, token_cross_entropy
from tscale.tasks import SFTTask, TaskContext


@attrs.frozen(kw_only=True)
class ConfidencePenaltySFT(SFTTask):
    """SFT whose loss is ``CE - beta * entropy`` per trained token; logs both parts."""

    type: str = field(
        "confidence_penalty_task:ConfidencePenaltySFT", "This task: module:ClassName."
    )
    beta: float = field(0.1, "Weight of the entropy bonus.", ge=0.0)
    key_metrics: ClassVar[tuple[str, ...]] = ("entropy",)

    def loss(self, ctx: TaskContext):
        apply_fn, beta = ctx.apply_fn, self.beta

        def loss_fn(params, batch, frozen=None):
            logits = apply_fn(params, batch)  # the trained positions (batch["logits_index"])
            labels = target_labels(batch)
            ce_sum, tokens = token_cross_entropy(logits, labels)
            logp = torch.log_softmax(logits.float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            entropy_sum = (entropy * (labels != IGNORE_INDEX)).sum()
            # sums, as every loss returns them: the step divides once by the batch's tokens;
            # the metrics declare a weighted mean, so accumulation and ranks keep them exact
            aux = {
                "tokens": tokens,
                "ce": mean(ce_sum, tokens),
                "entropy": mean(entropy_sum, tokens),
            }
            return ce_sum - beta * entropy_sum, aux

        return loss_fn
