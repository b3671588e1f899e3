"""The pretext tasks: each is one module with its class and options, registered by name (``registry``)."""

from __future__ import annotations

from pretextlab.tasks.base import EmbeddingOptions, Prepared, PretextTask, TaskOptions
from pretextlab.tasks.registry import TASK_REGISTRY, register_task, task_class, task_info, task_name, task_options

# Importing the built-in task modules registers them (the registry module imports none).
from pretextlab.tasks import rotation, exemplar, jigsaw, relative_patch  # noqa: E402,F401  isort: skip

# The tasks that ship with pretextlab, fixed before any plug-in can register: their options are
# TrainConfig's flat fields (the keys the run hash has always been taken over, so it is stable).
BUILT_IN_TASKS: tuple[str, ...] = TASK_REGISTRY.names()
TASKS = TASK_REGISTRY  # `name in TASKS`, iteration and ", ".join(TASKS) as before, plug-ins included


def build_task(spec: str, feature_dim: int, options: object = None) -> PretextTask:
    """The task ``spec`` (a name or ``module:Class``) with its head reading ``feature_dim``-dimensional
    pre_logits; ``options``: its options dataclass, a mapping or any object with fields of those names."""
    return task_class(spec)(feature_dim, options)


__all__ = [
    "BUILT_IN_TASKS", "TASKS", "TASK_REGISTRY", "EmbeddingOptions", "Prepared", "PretextTask", "TaskOptions",
    "build_task", "register_task", "task_class", "task_info", "task_name", "task_options",
]
