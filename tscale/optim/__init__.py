"""tscale.optim: optimizers as pure ``(init, update)`` transforms over TensorDict trees (as optax).

Example::

    from tscale import optim

    tx = optim.adamw(optim.warmup_cosine(3e-4, 100, 10_000), weight_decay=0.1, max_grad_norm=1.0)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)
"""

from tscale.optim.alias import OPTIMIZERS, adamw, build_optimizer
from tscale.optim.base import (
    GradientTransformation,
    InitFn,
    UpdateFn,
    apply_updates,
    chain,
    empty_state,
    identity,
)
from tscale.optim.schedules import (
    SCHEDULES,
    build_schedule,
    constant,
    cosine_decay,
    join,
    linear_warmup,
    warmup_cosine,
)
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    add_decayed_weights,
    clip_by_global_norm,
    default_decay_mask,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_schedule,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "GradientTransformation",
    "InitFn",
    "MaskFn",
    "Schedule",
    "UpdateFn",
    "adamw",
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
    "identity",
    "join",
    "linear_warmup",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "warmup_cosine",
]
