"""Tasks: label semantics, loss, predictions, metrics (see :mod:`tiahnm.tasks.base`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tiahnm.tasks.base import ALL_TASKS, Task, check_miner, task_from_spec


def build_task(name: str, options: Mapping[str, Any] | None, n_classes: int) -> Task:
    """The task ``name`` (``auto``: binary for 2 classes, else multiclass).

    Args:
        name (str): Registered task name or ``auto``.
        options (Mapping | None): ``task.options``.
        n_classes (int): Label values of the data (classification).
    """
    from tiahnm.plugins import ensure_options_mapping, get_registry

    opts = ensure_options_mapping(options, "task.options")
    if name == "auto":
        name = "binary" if n_classes <= 2 else "multiclass"
    return get_registry("task").create(name, key="task.options", **opts)


def default_task(n_classes: int) -> Task:
    """The task of a config without ``task``: binary or multiclass (no plugins)."""
    from tiahnm.tasks.classification import BinaryTask, MulticlassTask

    return BinaryTask() if n_classes <= 2 else MulticlassTask()


__all__ = [
    "ALL_TASKS",
    "Task",
    "build_task",
    "check_miner",
    "default_task",
    "task_from_spec",
]
