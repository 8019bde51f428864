"""Tasks: one module per training objective (see :mod:`tscale.tasks.base` for the contract)."""

from tscale.tasks.base import (
    TASKS,
    StatefulRollout,
    Task,
    TaskContext,
    TaskDefaults,
    register_task,
)
from tscale.tasks.grpo import GRPOTask, RLOOTask
from tscale.tasks.kto import KTOTask
from tscale.tasks.ppo import PPOTask
from tscale.tasks.preference import CPOTask, DPOTask, ORPOTask, PreferenceTask, SimPOTask
from tscale.tasks.reward import RewardTask
from tscale.tasks.sft import SFTTask

__all__ = [
    "TASKS",
    "CPOTask",
    "DPOTask",
    "GRPOTask",
    "KTOTask",
    "ORPOTask",
    "PPOTask",
    "PreferenceTask",
    "RLOOTask",
    "RewardTask",
    "SFTTask",
    "SimPOTask",
    "StatefulRollout",
    "Task",
    "TaskContext",
    "TaskDefaults",
    "register_task",
]
