"""Pure loss functions: token losses return a sum and the token count; preference losses
return per-example losses (see :mod:`tscale.losses.preference`)."""

from tscale.losses.lm import (
    IGNORE_INDEX,
    make_fused_lm_loss,
    make_lm_loss,
    token_cross_entropy,
)
from tscale.losses.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    KTO_LOSS_TYPES,
    PairLoss,
    UnpairedLoss,
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from tscale.losses.sequence import (
    DEFAULT_NUM_BRANCHES,
    PairView,
    SequenceLogps,
    pair_view,
    sequence_logps,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "DEFAULT_NUM_BRANCHES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "IGNORE_INDEX",
    "KTO_LOSS_TYPES",
    "PairLoss",
    "PairView",
    "SequenceLogps",
    "UnpairedLoss",
    "bradley_terry_loss",
    "cpo_loss",
    "dpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "make_fused_lm_loss",
    "make_lm_loss",
    "orpo_loss",
    "pair_view",
    "preference_metrics",
    "sequence_logps",
    "simpo_loss",
    "token_cross_entropy",
]
