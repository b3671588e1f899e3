"""Rotation (Gidaris et al. 2018) as the study runs it.

Every image of a batch of B appears in all four rotations (0, 90, 180, 270 degrees) in the same
batch of 4B; a 4-way linear head on pre_logits; softmax cross-entropy. Training input: inception
crop, horizontal flip, colours, values in [-1, 1]. Colours (``rotation_augmentation``): "released",
slim's fast-mode brightness and saturation (``augment.distort_color``), the default for folder
datasets; "jitter", torchvision-style jitter of ``color_jitter`` strength, the Fashion-MNIST default
and what every run before the option used (a config.json without the key loads as "jitter").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretextlab.data import augment
from dataclasses import dataclass

from pretextlab.errors import PretextlabError

from pretextlab.options import option
from pretextlab.data.crops import DecodePlan
from pretextlab.tasks.base import Prepared, PretextTask, TaskOptions, at_least, check_decoded_size, full_precision
from pretextlab.tasks.registry import register_task

NUM_ROTATIONS = 4
ROTATION_AUGMENTATIONS = ("released", "jitter")


@dataclass(frozen=True)
class RotationOptions(TaskOptions):
    """Rotation's own option (besides the run's image size, crop scale and flips)."""

    color_jitter: float = option(0.4, "colour-jitter strength (rotation, --rotation-augmentation jitter)")
    # None until config.resolve chooses by dataset; a task built without a run config reads None as "released".
    rotation_augmentation: str | None = option(
        None, "rotation training colours: released (flip, brightness +-32/255, saturation x0.5-1.5: slim's fast mode) "
        "or jitter (--color-jitter's brightness, contrast, saturation and hue); default: released for folder, "
        "jitter for fashion-mnist", metavar="{released,jitter}",
    )

    def check(self) -> None:
        super().check()
        at_least(self, "color_jitter", 0, "the jitter strength")
        if self.rotation_augmentation not in (None, *ROTATION_AUGMENTATIONS):
            raise PretextlabError(
                f"--rotation-augmentation {self.rotation_augmentation!r}: choose one of {', '.join(ROTATION_AUGMENTATIONS)}"
            )


def rotate_all(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W) holding every image at 0, 90, 180, 270 degrees, and the labels.

    Rotation k of image i sits at row k*B + i, so label = row // B.
    """
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)], dim=0)
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


@register_task("rotation", title="Rotation", default_batch_size=64, options=RotationOptions)
class RotationTask(PretextTask):
    patch_mode = False

    def __init__(self, feature_dim: int, options: RotationOptions | None = None) -> None:
        super().__init__(feature_dim, options)
        self.classifier = nn.Linear(feature_dim, NUM_ROTATIONS)

    def _view(self, images: torch.Tensor, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        x = augment.to_unit(images)
        size = self.options.image_size
        if train and self.options.crop_source == "full-image":
            # The loader cut the released inception crop from the whole file (decode_plan).
            check_decoded_size(images, size)
        elif train:
            x = augment.random_resized_crop(x, size, scale=self.options.crop_scale, generator=generator)
        if train:
            if self.options.flip:
                x = augment.random_flip(x, generator)
            if (self.options.rotation_augmentation or "released") == "released":
                # The released rotation config's inception_preprocess (config/rotation/imagenet.sh:31,
                # preprocess.py:36-42) is slim's preprocess_for_train in fast mode: after the flip,
                # brightness then saturation, clipped, then [-1, 1] below.
                x = augment.distort_color(x, generator)
            else:
                x = augment.color_jitter(x, self.options.color_jitter, generator)
        else:
            # Evaluation sees the central crop of the decoded image (decoded at 256 for a 224
            # input: the usual resize-256-centre-crop-224 protocol), resized only if too small.
            x = augment.resize(augment.center_crop(x, min(size, *x.shape[-2:])), size)
        return augment.to_signed(x)

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        return Prepared(*rotate_all(self._view(images, train, generator)))

    def forward(self, pre_logits: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.classifier(pre_logits)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(full_precision(outputs), targets)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((outputs.argmax(dim=1) == targets).sum()), int(targets.numel())

    def eval_views(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._view(images, train=False, generator=None), 1

    def decode_plan(self, train: bool) -> DecodePlan | None:
        # Issue 16: one slim inception crop per image, cut by the loader from the whole file.
        if train and self.options.crop_source == "full-image":
            return DecodePlan("inception", self.options.image_size)
        return None
