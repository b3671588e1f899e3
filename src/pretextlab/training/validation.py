"""Validation: the pretext accuracy of the current weights on a split, summed over all ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pretextlab.config import TrainConfig
from pretextlab.data import BatchLoader, ImageSet
from pretextlab.data.crops import with_resize
from pretextlab.tasks import PretextTask
from pretextlab.training.distributed import DistributedContext, all_reduce_sum

MIN_VAL_SCORED = 100  # below this many scored samples an accuracy's standard error exceeds ~5 points


@dataclass(frozen=True)
class PretextScore:
    """One validation pass: accuracy in percent (None when nothing was scored), samples scored and
    unreadable images skipped, all summed over ranks."""

    accuracy_percent: float | None
    scored: int
    skipped: int


@torch.no_grad()
def pretext_score(
    task: PretextTask,
    forward: Callable[[torch.Tensor, Any], torch.Tensor],
    images: ImageSet,
    config: TrainConfig,
    generator: Callable[[int], torch.Generator],
    device: torch.device,
    dist: DistributedContext,
) -> PretextScore:
    """Score ``task`` on ``images`` (at most ``config.val_batches`` batches per rank): ``forward``
    runs the network and head in eval mode, ``generator(batch_index)`` seeds each batch's views.
    Each rank reads its own shard; the counts are summed, so every rank gets the same score."""
    right = scored = skipped = 0
    loader = BatchLoader(
        images, config.batch_size, shuffle=False, drop_last=False, workers=config.workers,
        rank=dist.rank, world_size=dist.world_size, plan=with_resize(task.decode_plan(False), config.crop_resize),
    )
    for index, batch in enumerate(loader):
        if config.val_batches is not None and index >= config.val_batches:
            break
        skipped += batch.skipped
        if len(batch.labels) < 2:
            continue
        inputs, targets, context = task.prepare(batch.images.to(device, non_blocking=True), False, generator(index))
        r, s = task.correct(forward(inputs, context).float(), targets)
        right, scored = right + r, scored + s
    right, scored, skipped = all_reduce_sum([right, scored, skipped], device, dist)
    return PretextScore(100.0 * right / scored if scored else None, int(scored), int(skipped))
