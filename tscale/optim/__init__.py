"""tscale.optim: optimizers as pure ``(init, update)`` transforms over TensorDict trees (as optax).

Example::

    from tscale import optim

    sched = optim.warmup_cosine(3e-4, 100, 10_000)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched, weight_decay=0.1))
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optim.apply_updates(params, updates)

Every optimizer also has a config record beside its factory (``optim.AdamWConfig(lr=3e-4)
.build(sched)``); :data:`OPTIMIZER_CONFIGS` and :data:`SCHEDULE_CONFIGS` list them.
"""

from tscale.optim.adam8bit import BLOCK_SIZES, AdamW8bitConfig, scale_by_adam_8bit
from tscale.optim.alias import (
    OPTIMIZER_CONFIGS,
    OPTIMIZER_TYPES,
    OPTIMIZERS,
    AdamWConfig,
    OptimizerConfig,
    adamw,
    adamw_8bit,
    build_optimizer,
)
from tscale.optim.base import (
    GradientTransformation,
    InitFn,
    UpdateFn,
    apply_updates,
    chain,
    empty_state,
    identity,
)
from tscale.optim.lion import LionConfig, lion, scale_by_lion
from tscale.optim.muon import MuonConfig, muon, newton_schulz, partition, scale_by_muon
from tscale.optim.prodigy import ProdigyConfig, prodigy, scale_by_prodigy
from tscale.optim.record import CONFIG_MASK, Capabilities, OptimizerRecord
from tscale.optim.schedule_free import (
    ScheduleFreeAdamWConfig,
    scale_by_schedule_free_adamw,
    schedule_free_adamw,
    schedule_free_eval_params,
)
from tscale.optim.schedules import (
    DECAY_SHAPES,
    SCHEDULE_CONFIGS,
    SCHEDULE_TYPES,
    SCHEDULES,
    ConstantConfig,
    CosineConfig,
    CosineRestartsConfig,
    InverseSqrtConfig,
    LinearConfig,
    PolynomialConfig,
    RexConfig,
    SchedulerConfig,
    ScheduleRecord,
    WSDConfig,
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
from tscale.optim.sophia import SophiaGConfig, hessian_due, scale_by_sophia, sophia_g
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    add_decayed_weights,
    clip_by_global_norm,
    decoupled,
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
    "CONFIG_MASK",
    "DECAY_SHAPES",
    "OPTIMIZERS",
    "OPTIMIZER_CONFIGS",
    "OPTIMIZER_TYPES",
    "SCHEDULES",
    "SCHEDULE_CONFIGS",
    "SCHEDULE_TYPES",
    "AdamW8bitConfig",
    "AdamWConfig",
    "Capabilities",
    "ConstantConfig",
    "CosineConfig",
    "CosineRestartsConfig",
    "GradientTransformation",
    "InitFn",
    "InverseSqrtConfig",
    "LinearConfig",
    "LionConfig",
    "MaskFn",
    "MuonConfig",
    "OptimizerConfig",
    "OptimizerRecord",
    "PolynomialConfig",
    "ProdigyConfig",
    "RexConfig",
    "Schedule",
    "ScheduleFreeAdamWConfig",
    "ScheduleRecord",
    "SchedulerConfig",
    "SophiaGConfig",
    "UpdateFn",
    "WSDConfig",
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
    "decoupled",
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
    "wsd",
]
