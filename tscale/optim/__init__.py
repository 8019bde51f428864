"""tscale.optim: optimizers as pure ``(init, update)`` transforms over TensorDict trees (as optax).

Example::

    from tscale import optim

    tx = optim.adamw(optim.warmup_cosine(3e-4, 100, 10_000), weight_decay=0.1, max_grad_norm=1.0)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)
"""

from tscale.optim.adam8bit import BLOCK_SIZES, scale_by_adam_8bit
from tscale.optim.alias import OPTIMIZERS, adamw, adamw_8bit, build_optimizer
from tscale.optim.base import (
    GradientTransformation,
    InitFn,
    UpdateFn,
    apply_updates,
    chain,
    empty_state,
    identity,
)
from tscale.optim.lion import lion, scale_by_lion
from tscale.optim.muon import muon, newton_schulz, partition, scale_by_muon
from tscale.optim.prodigy import prodigy, scale_by_prodigy
from tscale.optim.schedule_free import (
    scale_by_schedule_free_adamw,
    schedule_free_adamw,
    schedule_free_eval_params,
)
from tscale.optim.schedules import (
    DECAY_SHAPES,
    SCHEDULE_ARGS,
    SCHEDULES,
    build_schedule,
    constant,
    cosine_decay,
    inverse_sqrt,
    join,
    linear_warmup,
    polynomial,
    rex,
    warmup_cosine,
    warmup_cosine_restarts,
    warmup_linear,
    wsd,
)
from tscale.optim.sophia import (
    hessian_due,
    scale_by_sophia,
    sophia_g,
    with_hessian_estimate,
    without_hessian_estimate,
)
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    add_decayed_weights,
    clip_by_global_norm,
    default_decay_mask,
    no_decay_mask,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_schedule,
    skip_nonfinite,
    skipped_steps,
)

__all__ = [
    "BLOCK_SIZES",
    "DECAY_SHAPES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SCHEDULE_ARGS",
    "GradientTransformation",
    "InitFn",
    "MaskFn",
    "Schedule",
    "UpdateFn",
    "adamw",
    "adamw_8bit",
    "add_decayed_weights",
    "apply_updates",
    "build_optimizer",
    "build_schedule",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "default_decay_mask",
    "empty_state",
    "hessian_due",
    "identity",
    "inverse_sqrt",
    "join",
    "linear_warmup",
    "lion",
    "muon",
    "newton_schulz",
    "no_decay_mask",
    "partition",
    "polynomial",
    "prodigy",
    "rex",
    "scale",
    "scale_by_adam",
    "scale_by_adam_8bit",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_prodigy",
    "scale_by_schedule",
    "scale_by_schedule_free_adamw",
    "scale_by_sophia",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "skip_nonfinite",
    "skipped_steps",
    "sophia_g",
    "warmup_cosine",
    "warmup_cosine_restarts",
    "warmup_linear",
    "with_hessian_estimate",
    "without_hessian_estimate",
    "wsd",
]
