"""The pretext-task registry: ``register_task``, ``task_class``, ``task_info``; imports no task.

A task module registers its class with its metadata (``pretextlab.registry.TaskInfo``)::

    @register_task("rotation", title="Rotation", default_batch_size=64, options=RotationOptions)
    class RotationTask(PretextTask): ...

so adding a task is one file plus that line. A task outside this package is named on the command
line as ``module:Class`` (``--task mypkg.toy:ToyTask``): the module is imported, which registers the
class, and the spec itself is what a run's config.json records, so resume and evaluate find it again.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pretextlab.errors import PretextlabError
from pretextlab.registry import Registry, TaskInfo

TASK_REGISTRY: Registry[type] = Registry("task", TaskInfo)


def register_task(name: str, *, title: str, default_batch_size: int, options: type, **metadata: Any) -> Callable[[type], type]:
    """Class decorator: register a ``PretextTask`` subclass under ``name`` with its title, the study's
    batch size in images, and its options dataclass (a ``tasks.base.TaskOptions`` subclass whose
    ``check`` holds the task's checks); sets the class's ``name`` and ``options_class``."""

    def decorate(cls: type) -> type:
        cls.name = name
        cls.options_class = options
        patch_mode = bool(getattr(cls, "patch_mode", False))
        return TASK_REGISTRY.register(
            name, title=title, default_batch_size=default_batch_size, options=options, patch_mode=patch_mode, **metadata
        )(cls)

    return decorate


def task_name(spec: str) -> str:
    """The registered name of ``spec``: a name, or ``module:Class`` (importing the module registers it)."""
    if not isinstance(spec, str) or ":" not in spec:
        TASK_REGISTRY.get(spec)  # a clear error listing the names if unknown
        return spec
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PretextlabError(
            f"task {spec!r}: cannot import module {module_name!r} ({error}); put its folder on PYTHONPATH"
        ) from error
    cls = getattr(module, class_name, None)
    name = getattr(cls, "name", None)
    if cls is None or name not in TASK_REGISTRY or TASK_REGISTRY.get(name) is not cls:
        raise PretextlabError(
            f"task {spec!r}: {module_name} has no registered task class {class_name!r}; "
            "decorate the class with @pretextlab.tasks.register_task(name, ...)"
        )
    return name


def task_class(spec: str) -> type:
    """The task class that ``spec`` (a name or ``module:Class``) names."""
    return TASK_REGISTRY.get(task_name(spec))


def task_info(spec: str) -> TaskInfo:
    """What the task ``spec`` declares (title, batch size, options dataclass), without building it."""
    return TASK_REGISTRY.metadata(task_name(spec))


def task_options(spec: str, values: Any = None) -> Any:
    """The task's own options dataclass filled from ``values`` (a TrainConfig: the fields of the same
    names; a mapping; None: the defaults), and checked by the task's ``check``."""
    from pretextlab.tasks.base import options_of

    options = options_of(task_info(spec).options, values)
    options.check()
    return options
