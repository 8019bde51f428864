"""The process group and the named device mesh of a run, from torchrun's environment.

``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint host:port]`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them and joins the group (gloo on CPU, NCCL on CUDA). The mesh has two named axes,
``dp_replicate`` (DDP replicas, outer) and ``dp_shard`` (FSDP shards within a replica, inner):

- ``dp_shard == 1``: DDP — every rank holds the whole params, gradients are all-reduced;
- ``dp_replicate == 1``: FSDP — params and optimizer state sharded over all ranks;
- both > 1: HSDP — sharded within a replica, replicated across replicas.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import attrs
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tscale.errors import ConfigError

__all__ = ["ParallelPlan", "init_distributed", "plan_parallel", "world_from_env"]

REPLICATE = "dp_replicate"
SHARD = "dp_shard"


@attrs.frozen(kw_only=True)
class ParallelPlan:
    """What this process is in the run: its rank, the world, the mesh and the strategy.

    ``strategy`` is ``"none"`` (one process), ``"ddp"``, ``"fsdp"`` or ``"hsdp"``. ``mesh`` is
    None for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_replicate: int = 1
    dp_shard: int = 1
    mesh: DeviceMesh | None = None

    @property
    def strategy(self) -> str:
        if self.world_size == 1:
            return "none"
        if self.dp_shard == 1:
            return "ddp"
        return "fsdp" if self.dp_replicate == 1 else "hsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes run files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.dp_shard > 1

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of one mesh axis (``dp_replicate`` or ``dp_shard``)."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(axis)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def world_from_env(env: Mapping[str, str]) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables (one process without them).

    Raises:
        ConfigError: the variables are partial or inconsistent.
    """
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return 0, 1, 0
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"torchrun environment incomplete or invalid ({err}): RANK and WORLD_SIZE must both "
            "be integers; launch with `torchrun --nproc-per-node N -m tscale.cli train CFG`"
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def _degrees(dp_replicate: int, dp_shard: int, world: int) -> tuple[int, int]:
    """Resolve -1 ("the rest of the world") and check the product equals the world size.

    One process (no torchrun) runs the same YAML unsharded: the degrees collapse to 1."""
    for name, v in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard)):
        if v == 0 or v < -1:
            raise ConfigError(f"parallel.{name} must be a positive int or -1, got {v}")
    if dp_replicate == -1 and dp_shard == -1:
        raise ConfigError("parallel.dp_replicate and parallel.dp_shard cannot both be -1")
    if world == 1:
        return 1, 1
    if dp_replicate == -1:
        if world % dp_shard:
            raise ConfigError(
                f"parallel.dp_shard={dp_shard} does not divide the world size {world}"
            )
        dp_replicate = world // dp_shard
    if dp_shard == -1:
        if world % dp_replicate:
            raise ConfigError(
                f"parallel.dp_replicate={dp_replicate} does not divide the world size {world}"
            )
        dp_shard = world // dp_replicate
    if dp_replicate * dp_shard != world:
        raise ConfigError(
            f"parallel.dp_replicate ({dp_replicate}) x parallel.dp_shard ({dp_shard}) must equal "
            f"the number of processes ({world}); set one of them to -1 to fill the rest"
        )
    return dp_replicate, dp_shard


def init_distributed(
    env: Mapping[str, str], device: torch.device, backend: str = "auto", timeout_s: float = 600
) -> tuple[int, int, int]:
    """Join the process group torchrun describes (a no-op for one process or when joined).

    Returns ``(rank, world_size, local_rank)``.
    """
    rank, world, local = world_from_env(env)
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return rank, world, local
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world, local


def plan_parallel(
    rank: int, world: int, local_rank: int, dp_replicate: int, dp_shard: int, device_type: str
) -> ParallelPlan:
    """The mesh of an initialised process group with the degrees of ``parallel:``.

    Raises:
        ConfigError: the degrees do not multiply to the world size.
    """
    rep, shard = _degrees(dp_replicate, dp_shard, world)
    mesh = None
    if world > 1:
        mesh = init_device_mesh(device_type, (rep, shard), mesh_dim_names=(REPLICATE, SHARD))
    return ParallelPlan(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        dp_replicate=rep,
        dp_shard=shard,
        mesh=mesh,
    )
