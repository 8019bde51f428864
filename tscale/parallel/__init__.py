"""Data parallelism as wrappers over params and steps: DDP, FSDP and HSDP on a named mesh.

The model code stays single-device. :mod:`~tscale.parallel.mesh` joins torchrun's process group
and builds the ``(dp_replicate, dp_shard)`` mesh; :mod:`~tscale.parallel.ddp` all-reduces summed
gradients inside the step; :mod:`~tscale.parallel.fsdp` shards params and optimizer state as
DTensors and all-gathers each layer on use. See docs/distributed.md.
"""

from tscale.parallel.ddp import bucket_indices, make_ddp_sync
from tscale.parallel.fsdp import (
    FSDPLayout,
    full_tree,
    local_tree,
    make_fsdp_sync,
    shard_tree,
    sharded_norm,
    wrap_fsdp_step,
)
from tscale.parallel.mesh import ParallelPlan, init_distributed, plan_parallel, world_from_env

__all__ = [
    "FSDPLayout",
    "ParallelPlan",
    "bucket_indices",
    "full_tree",
    "init_distributed",
    "local_tree",
    "make_ddp_sync",
    "make_fsdp_sync",
    "plan_parallel",
    "shard_tree",
    "sharded_norm",
    "world_from_env",
    "wrap_fsdp_step",
]
