"""Relative Patch Location (Doersch et al. 2015) as the study runs it.

Every image is cut into its 3x3 grid of patches (see ``patches``); each patch goes through the
shared network to pre_logits and a linear layer to a 1000-d embedding. Every image contributes all 8
pairs of (neighbour, centre): the two embeddings are concatenated, neighbour first as in the
released code's ``(i, 4)`` pairs -> FC 4096 -> BN -> ReLU -> dropout 0.5 -> 8-way classifier.

The target is the neighbour's position among the 8, in row-major grid order with the centre
skipped::

    0 1 2        top-left     top     top-right
    3 . 4   =    left       (centre)  right
    5 6 7        bottom-left  bottom  bottom-right

so target t is grid cell ``NEIGHBOURS[t]`` (t, or t + 1 from 4 on). Outputs and targets are
image-major: row ``8*b + t`` is image b's pair with neighbour t.
"""

from __future__ import annotations

from typing import Any

import torch

from pretextlab.tasks.base import Prepared
from pretextlab.tasks.patches import CENTRE_CELL, GRID_CELLS, PatchOptions, PatchTask
from pretextlab.tasks.registry import register_task

NEIGHBOURS = tuple(cell for cell in range(GRID_CELLS) if cell != CENTRE_CELL)
# (row, column) offset of each neighbour from the centre, in target order.
NEIGHBOUR_OFFSETS = tuple((cell // 3 - 1, cell % 3 - 1) for cell in NEIGHBOURS)


@register_task("relative_patch", title="Relative Patch Location", default_batch_size=128, options=PatchOptions)
class RelativePatchTask(PatchTask):
    def __init__(self, feature_dim: int, options: PatchOptions | None = None) -> None:
        super().__init__(feature_dim, options, slots=2, classes=len(NEIGHBOURS))
        pairs = torch.tensor([[cell, CENTRE_CELL] for cell in NEIGHBOURS], dtype=torch.long)
        self.register_buffer("pairs", pairs, persistent=False)

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        patches, _ = self.patches(images, train, generator)
        targets = torch.arange(self.classes, device=images.device).repeat(images.shape[0])
        return Prepared(patches, targets)

    def arrangements(self, device: torch.device, context: Any = None) -> torch.Tensor:
        """The 8 (neighbour, centre) pairs, in target order (the same for every batch)."""
        return self.pairs.to(device)
