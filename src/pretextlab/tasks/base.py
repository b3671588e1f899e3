"""The contract every pretext task keeps.

A task never touches the network's internals. It turns a batch of decoded uint8 images (on the
training device) into the network's inputs and the task's targets, owns a head that reads the
network's ``pre_logits``, and defines the loss and the pretext accuracy. It also says how a frozen
network trained with it is fed at evaluation time (``eval_views``): whole images, or for the patch
tasks the 3x3 grid of patches whose features are averaged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.options import check_choices, check_fields, check_instance, flag_name, option


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: losses are computed in full precision under bf16/fp16 autocast,
    and float64 (the trainer's exactness-check precision) is kept as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_decoded_size(images: torch.Tensor, size: int) -> None:
    """Images the loader already cropped (``crop_source`` "full-image") are ``size`` pixels square:
    anything else means the loader was not given the task's ``decode_plan``."""
    if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
        raise PretextlabError(
            f"training images cropped while decoding (crop_source full-image) must be {size}x{size}, got shape "
            f"{tuple(images.shape)}: give the loader the task's decode_plan, or use --crop-source center-square"
        )


class Prepared(NamedTuple):
    """A batch as a task prepared it: the network's inputs, the targets, and what ``forward`` needs."""

    inputs: torch.Tensor
    targets: torch.Tensor
    context: Any = None


@dataclass(frozen=True)
class TaskOptions:
    """What every task receives from the run, not options of its own: the base of each task's
    options dataclass.

    ``image_size`` is the side of the network input of the whole-image tasks (Rotation, Exemplar);
    ``crop_scale`` and ``flip`` are the run's augmentation settings; ``seed`` the run's seed (Jigsaw
    draws its permutation set from it); ``cache_dir`` holds generated permutation sets (default
    ``$PRETEXTLAB_CACHE`` or ``~/.cache/pretextlab``). Their command-line definitions are
    ``config.TrainConfig``'s; a task's own options are the fields its subclass adds with
    ``options.option(...)``, and those alone become flags (see ``own_fields``).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True  # random horizontal flips (off for data whose meaning flips, e.g. digits, text)
    seed: int = 0
    cache_dir: str | None = None
    # Issue 16 (data/crops.py): "full-image" = the loader already cut the training crops while
    # decoding (``decode_plan``), so the task must not crop training images again; and "released"
    # = TF's BatchNorm defaults in the task's head too. Both default to what runs did before them.
    crop_source: str = "center-square"
    bn_init: str = "pytorch"

    def check(self) -> None:
        """Raise PretextlabError for values of the right type that the task cannot use; subclasses
        extend it (calling ``super().check()``), so each task's checks live with its options."""
        check_choices(self)


def own_fields(options: type) -> tuple[dataclasses.Field, ...]:
    """The fields a task's options class adds to ``TaskOptions``: the task's own options."""
    shared = {f.name for f in dataclasses.fields(TaskOptions)}
    return tuple(f for f in dataclasses.fields(options) if f.name not in shared)


def at_least(options: Any, name: str, low: float, meaning: str) -> None:
    """The option ``name`` of ``options`` is a finite number >= ``low`` (one error naming its flag)."""
    value = getattr(options, name)
    if not math.isfinite(value):
        raise PretextlabError(f"{flag_name(name)} must be a finite number, got {value!r}")
    if value < low:
        raise PretextlabError(f"{flag_name(name)} must be >= {low} ({meaning}), got {value!r}")


@dataclass(frozen=True)
class EmbeddingOptions(TaskOptions):
    """Options shared by the tasks that embed what the network sees and turn images gray (Exemplar,
    Jigsaw, Relative Patch Location): defined once here, one flag each."""

    gray_probability: float = option(0.66, "probability of a gray image (exemplar, patch tasks)", metavar="P")
    embedding_dim: int = option(1000, "per-patch vector (jigsaw, relative_patch) and exemplar embedding size")

    def check(self) -> None:
        super().check()
        at_least(self, "gray_probability", 0, "a probability")
        if self.gray_probability > 1:
            raise PretextlabError(f"--gray-probability must be <= 1 (a probability), got {self.gray_probability!r}")
        at_least(self, "embedding_dim", 1, "dimensions")


def options_of(options_class: type, given: Any = None) -> Any:
    """An instance of ``options_class`` from ``given``: None (the defaults), an instance of it, or
    a mapping / any dataclass instance whose fields of the same names are taken (e.g. the base
    ``TaskOptions(image_size=32)``, or a whole TrainConfig); every value type-checked."""
    if isinstance(given, options_class):
        return check_instance(given)
    names = {f.name for f in dataclasses.fields(options_class)}
    if given is None:
        values: dict[str, Any] = {}
    elif isinstance(given, Mapping):
        unknown = sorted(set(given) - names)
        if unknown:
            raise PretextlabError(
                f"unknown option(s) {', '.join(unknown)} for {options_class.__name__}: valid are {', '.join(sorted(names))}"
            )
        values = dict(given)
    else:
        values = {name: getattr(given, name) for name in names if hasattr(given, name)}
    values = {k: v for k, v in values.items() if v is not None or k == "cache_dir"}
    return options_class(**check_fields(options_class, values, options_class.__name__))


class PretextTask(nn.Module):
    """Base class: subclasses set ``patch_mode``, implement the five methods and register with
    ``tasks.registry.register_task``, which sets ``name`` and ``options_class`` (one place each)."""

    name: ClassVar[str]
    options_class: ClassVar[type] = TaskOptions
    patch_mode: ClassVar[bool] = False

    def __init__(self, feature_dim: int, options: Any = None) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        # The task's own options dataclass, checked where it is defined (its ``check``).
        self.options = options_of(self.options_class, options)
        self.options.check()

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        """uint8 (B, 3, H, W) on the device -> (float network inputs, targets, context), on the device.

        ``context`` is whatever ``forward`` needs to know about this batch (Jigsaw: the permutations
        it was drawn under; None for most tasks): it travels with the batch, never on the task, so
        two batches in flight cannot mix. All randomness comes from ``generator`` (a generator on
        the images' device) so a run can be replayed and resumed exactly; ``train=False`` is
        deterministic where the study is.
        """
        raise NotImplementedError

    def forward(self, pre_logits: torch.Tensor, context: Any = None) -> torch.Tensor:
        """The head: the network's flat pre_logits for every input (and the batch's ``context``
        from ``prepare``) -> the task's outputs."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """(number right, number scored) for the pretext accuracy."""
        raise NotImplementedError

    def eval_views(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """uint8 (B, 3, H, W) -> (float inputs of B*V views, V) for frozen-feature extraction.

        The features of the V views of an image are pooled separately and then averaged.
        """
        raise NotImplementedError

    def decode_plan(self, train: bool) -> Any:
        """How the loader decodes this task's image files for ``prepare(train=train)`` (a
        ``data.DecodePlan``), or None for the decoded centre square (issue 16, data/crops.py).
        Only with ``crop_source == "full-image"``; the base task needs nothing special."""
        return None
