"""Rollout statistics over the global batch, and the gather that makes them global.

The rollout stage runs on the host side of each step (rewards are Python), so its statistics are
plain numbers; they reach ``metrics.jsonl`` through the batch: :func:`stats_rows` writes them as
one float row per completion (the same values in every row), and the loss returns each column
as a mean over its rows, which is the value itself whatever the microbatch split or world size
(see :mod:`tscale.tasks.grpo`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "completion_stats",
    "gather_present",
    "rank_and_world",
    "reward_stats",
    "stats_rows",
]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank concatenated along dim 0 in rank order (every rank holds the same
    number of rows: a group is never split, every rank has ``batch_size / world`` prompts)."""
    _, world = rank_and_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def gather_present(obj: Any, device: torch.device | str) -> dict[int, Any]:
    """Every rank's ``obj`` that is not None, by rank, on every rank: one all-gather of a
    one-element flag per rank (on ``device``, the process group's), then the objects themselves
    (``all_gather_object``) only when some rank has one. Lets ranks agree on a rare event (a
    reward over its failure limit on one rank) at the cost of one tiny collective per call;
    one process: no collective."""
    rank, world = rank_and_world()
    if world == 1:
        return {} if obj is None else {rank: obj}
    flag = torch.tensor([obj is not None], dtype=torch.int64, device=device)  # gloo: no bool
    present = all_gather_rows(flag).tolist()
    if not any(present):
        return {}
    objs: list[Any] = [None] * world
    dist.all_gather_object(objs, obj)
    return {r: o for r, o in enumerate(objs) if present[r]}


def _nanmean(x: torch.Tensor) -> float:
    kept = x[~x.isnan()]
    return float(kept.double().mean()) if kept.numel() else math.nan


def _nanstd(x: torch.Tensor) -> float:
    kept = x[~x.isnan()].double()
    if kept.numel() < 2:
        return math.nan
    return float(((kept - kept.mean()) ** 2).sum().div(kept.numel() - 1).sqrt())


def reward_stats(
    total: torch.Tensor, per_function: torch.Tensor, names: Sequence[str], zero_std: torch.Tensor
) -> dict[str, float]:
    """TRL's reward metrics of the (gathered) batch: ``reward``, ``reward_std``, per function
    ``reward/<name>`` and ``reward/<name>/std`` (over the completions it scored),
    ``reward/unscorable`` (a fraction) and ``frac_reward_zero_std`` (groups without spread)."""
    out = {"reward": _nanmean(total), "reward_std": _nanstd(total)}
    for i, name in enumerate(names):
        out[f"reward/{name}"] = _nanmean(per_function[:, i])
        out[f"reward/{name}/std"] = _nanstd(per_function[:, i])
    out["reward/unscorable"] = float(total.isnan().double().mean()) if total.numel() else 0.0
    out["frac_reward_zero_std"] = float(zero_std.double().mean()) if zero_std.numel() else 0.0
    return out


def completion_stats(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """``completions/{mean,min,max}_length`` and ``completions/clipped_ratio`` (the fraction
    that hit the length limit without a stop id), as TRL names them."""
    lengths = lengths.double()
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.double().mean()),
    }


def stats_rows(stats: Mapping[str, float], names: Sequence[str], rows: int) -> torch.Tensor:
    """``[rows, len(names)]`` float64: ``stats[name]`` in column ``name`` of every row (NaN for a
    name it lacks)."""
    values = torch.tensor([stats.get(n, math.nan) for n in names], dtype=torch.float64)
    return values.expand(rows, len(names)).clone()
