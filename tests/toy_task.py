"""A toy fifth pretext task, outside the package: one file plus its registration (issue 15).

Upside-down: every image appears upright and turned by 180 degrees in the same batch; a 2-way
linear head on pre_logits says which. Trained with ``--task toy_task:UpsideDownTask`` when this
folder is on the import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretextlab.data import augment
from pretextlab.options import option
from pretextlab.tasks import Prepared, PretextTask, TaskOptions, register_task


@dataclass(frozen=True)
class UpsideDownOptions(TaskOptions):
    """Its one option of its own (a plug-in's options take their defaults from the command line)."""

    label_smoothing: float = option(0.0, "toy: label smoothing of the 2-way cross-entropy")


@register_task("upside_down", title="Upside Down (toy)", default_batch_size=32, options=UpsideDownOptions)
class UpsideDownTask(PretextTask):
    def __init__(self, feature_dim: int, options: UpsideDownOptions | None = None) -> None:
        super().__init__(feature_dim, options)
        self.classifier = nn.Linear(feature_dim, 2)

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        x = augment.to_unit(images)
        return augment.to_signed(augment.resize(augment.center_crop(x, min(self.options.image_size, *x.shape[-2:])),
                                                self.options.image_size))

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        x = self._view(images)
        inputs = torch.cat([x, torch.rot90(x, 2, dims=(-2, -1))])
        return Prepared(inputs, torch.arange(2, device=x.device).repeat_interleave(x.shape[0]))

    def forward(self, pre_logits: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.classifier(pre_logits)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.options.label_smoothing)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((outputs.argmax(dim=1) == targets).sum()), int(targets.numel())

    def eval_views(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self._view(images), 1
