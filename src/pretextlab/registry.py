"""Named registries (networks, pretext tasks) filled by decorators with metadata; a leaf: imports no implementation.

    NETWORKS = Registry("network", NetworkInfo)

    @NETWORKS.register("revnet50", title="RevNet50", outputs=(...), default_width=4)
    def revnet50(...): ...

    NETWORKS.get("revnet50")        # the registered object (a clear error listing the names if unknown)
    NETWORKS.metadata("revnet50")   # its frozen NetworkInfo, readable without building anything
    NETWORKS.names()                # registration order

The pattern is torchvision's ``models/_api.py`` (a ``register_model`` decorator fills a module that
imports no model) with timm's ``feature_info`` (a network declares its outputs as metadata). This
module must stay importable on its own: the registries' users import the implementations, never
the other way round, which is what keeps the dependency graph free of cycles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from pretextlab.errors import PretextlabError

T = TypeVar("T")


@dataclass(frozen=True)
class NetworkInfo:
    """What a network family declares about itself, known without building one."""

    name: str
    title: str  # how reports and help name it, e.g. "ResNet50 v2"
    outputs: tuple[str, ...]  # the keys its forward returns, in network order
    default_width: int  # the widening factor k when none is given
    has_final_relu_variant: bool = False  # whether the study's "(-)" variant (no ReLU before pooling) exists
    no_final_relu_variant_because: str = ""  # why not, for the error when "(-)" is asked of it
    supports_reversible_backward: bool = False  # backprop by recomputing activations (reversible units)


@dataclass(frozen=True)
class TaskInfo:
    """What a pretext task declares about itself, known without building one."""

    name: str
    title: str  # how reports and help name it, e.g. "Relative Patch Location"
    default_batch_size: int = 256  # images per step in the study's recipe
    options: type | None = None  # the task's own options dataclass, passed through untouched
    patch_mode: bool = False  # whether the network sees patches (Jigsaw, Relative Patch Location)
    extra: tuple[tuple[str, Any], ...] = ()  # anything else a task wants to declare, as (key, value) pairs


class Registry(Generic[T]):
    """Names -> registered objects of one kind, each with a frozen metadata record of class ``info``.

    ``info`` is a dataclass whose first field is ``name``; ``register(name, **metadata)`` builds
    ``info(name=name, **metadata)`` at decoration time, so a wrong or missing field fails at import
    of the registering module rather than when the object is first used.
    """

    def __init__(self, kind: str, info: type) -> None:
        if not dataclasses.is_dataclass(info) or "name" not in {f.name for f in dataclasses.fields(info)}:
            raise TypeError(f"the metadata class of a registry must be a dataclass with a 'name' field, got {info!r}")
        self.kind = kind
        self.info = info
        self._objects: dict[str, T] = {}
        self._metadata: dict[str, Any] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` with its metadata; returns it unchanged."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        try:
            record = self.info(name=name, **metadata)
        except TypeError as error:
            fields = ", ".join(f.name for f in dataclasses.fields(self.info) if f.name != "name")
            raise TypeError(f"{self.kind} {name!r}: bad metadata ({error}); the fields are {fields}") from error

        def decorate(obj: T) -> T:
            previous = self._objects.get(name)
            # Re-registering the same object (a module imported twice, e.g. under importlib.reload)
            # is harmless; a second, different object under one name is a programming error.
            if previous is not None and getattr(previous, "__qualname__", None) != getattr(obj, "__qualname__", object()):
                raise PretextlabError(f"{self.kind} {name!r} is registered twice ({previous!r} and {obj!r}): pick another name")
            self._objects[name] = obj
            self._metadata[name] = record
            return obj

        return decorate

    def _check(self, name: str) -> None:
        if name not in self._objects:
            known = ", ".join(self._objects) or "none registered"
            raise PretextlabError(f"unknown {self.kind} {name!r}: choose one of {known}")

    def get(self, name: str) -> T:
        """The object registered under ``name``."""
        self._check(name)
        return self._objects[name]

    def metadata(self, name: str) -> Any:
        """The frozen metadata record of ``name`` (an instance of this registry's ``info`` class)."""
        self._check(name)
        return self._metadata[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._objects)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._objects))

    def __len__(self) -> int:
        return len(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._objects)})"
