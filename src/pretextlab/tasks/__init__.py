"""The pretext tasks, by name: each is one small module with one class (see ``base.PretextTask``)."""

from __future__ import annotations

import importlib

from pretextlab.errors import PretextlabError
from pretextlab.tasks.base import Prepared, PretextTask, TaskOptions

# name -> "module:Class"; imported on demand so a task's module loads only when it is used.
_TASK_CLASSES = {
    "rotation": "pretextlab.tasks.rotation:RotationTask",
    "exemplar": "pretextlab.tasks.exemplar:ExemplarTask",
    "jigsaw": "pretextlab.tasks.jigsaw:JigsawTask",
    "relative_patch": "pretextlab.tasks.relative_patch:RelativePatchTask",
}
TASKS: tuple[str, ...] = tuple(_TASK_CLASSES)


def task_class(name: str) -> type[PretextTask]:
    if name not in _TASK_CLASSES:
        raise PretextlabError(f"unknown pretext task {name!r}: choose one of {', '.join(TASKS)}")
    module_name, class_name = _TASK_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_task(name: str, feature_dim: int, options: TaskOptions | None = None) -> PretextTask:
    """The task ``name`` with its head reading ``feature_dim``-dimensional pre_logits."""
    return task_class(name)(feature_dim, options or TaskOptions())


__all__ = ["TASKS", "Prepared", "PretextTask", "TaskOptions", "build_task", "task_class"]
