"""Tasks: one module per training objective (see :mod:`tscale.tasks.base` for the contract)."""

from tscale.tasks.base import TASKS, Task, TaskContext, TaskDefaults, register_task
from tscale.tasks.sft import SFTTask

__all__ = ["TASKS", "SFTTask", "Task", "TaskContext", "TaskDefaults", "register_task"]
