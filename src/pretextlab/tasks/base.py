"""The contract every pretext task keeps.

A task never touches the network's internals. It turns a batch of decoded uint8 images (on the
training device) into the network's inputs and the task's targets, owns a head that reads the
network's ``pre_logits``, and defines the loss and the pretext accuracy. It also says how a frozen
network trained with it is fed at evaluation time (``eval_views``): whole images, or for the patch
tasks the 3x3 grid of patches whose features are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: losses are computed in full precision under bf16/fp16 autocast,
    and float64 (the trainer's exactness-check precision) is kept as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Prepared(NamedTuple):
    """A batch as a task prepared it: the network's inputs, the targets, and what ``forward`` needs."""

    inputs: torch.Tensor
    targets: torch.Tensor
    context: Any = None


@dataclass(frozen=True)
class TaskOptions:
    """Options shared by the tasks; each task reads the ones it needs.

    ``image_size`` is the side of the network input of the whole-image tasks (Rotation, Exemplar).
    ``patch_size`` is the one size parameter of the patch tasks (Jigsaw, Relative Patch Location):
    64 is the study's geometry (resize 292, crop 255, cells of 85, patches of 64) and every other
    side is derived from it proportionally (``tasks.patches.PatchGeometry``).

    Choices where the study's released code and the obvious reading differ:
    ``permutation_criterion`` "mean" (Noroozi & Favaro's Algorithm 1, the released set) or "min"
    (max-min Hamming distance); ``patch_eval_geometry`` "released" (resize 3.5p, centre crop 3p,
    adjacent p-px patches, as the released evaluation) or "pretext" (the training geometry with
    central crops); ``exemplar_normalization`` "batch" (the released ``l2_normalize(axis=0)``: each
    embedding dimension is normalised over the batch), "embedding" (each embedding to unit length)
    or "none"; ``exemplar_color_distortion`` the released inception preprocessing's random
    brightness and saturation on each copy. ``cache_dir`` holds generated permutation sets
    (default ``$PRETEXTLAB_CACHE`` or ``~/.cache/pretextlab``).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 0.4
    flip: bool = True  # random horizontal flips (off for data whose meaning flips, e.g. digits, text)
    gray_probability: float = 0.66
    copies: int = 8
    permutations_per_batch: int = 8
    num_permutations: int = 100
    embedding_dim: int = 1000
    head_hidden: int = 4096
    dropout: float = 0.5
    margin: float = 0.5
    patch_size: int = 64
    seed: int = 0
    permutation_criterion: str = "mean"
    patch_eval_geometry: str = "released"
    exemplar_normalization: str = "batch"
    exemplar_color_distortion: bool = True
    cache_dir: str | None = None


class PretextTask(nn.Module):
    """Base class: subclasses set ``name`` and ``patch_mode`` and implement the five methods."""

    name: ClassVar[str]
    patch_mode: ClassVar[bool] = False

    def __init__(self, feature_dim: int, options: TaskOptions) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.options = options

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
