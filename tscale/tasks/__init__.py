"""Tasks: one module per training objective (see :mod:`tscale.tasks.base` for the contract)."""

from tscale.tasks.base import TASKS, Task, TaskContext, TaskDefaults, register_task
from tscale.tasks.reward import RewardTask
from tscale.tasks.sft import SFTTask

__all__ = ["TASKS", "RewardTask", "SFTTask", "Task", "TaskContext", "TaskDefaults", "register_task"]
