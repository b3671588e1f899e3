"""Batches of decoded uint8 images, in an order that is a pure function of (seed, epoch).

The loader only decodes (augmentation runs later, on the training device). It resumes exactly: a
loader started at ``start_batch=k`` yields the same batches a full epoch yields from its k-th on.
With ``world_size`` > 1 each rank reads a disjoint strided slice of the epoch's order (as
DistributedSampler does); unlike DistributedSampler nothing is padded or repeated:

- ``drop_last=True`` (training): the order is cut to a multiple of ``world_size``, so every rank
  gets the same number of images and batches, and the last partial batch is dropped;
- ``drop_last=False`` (evaluation): every image is read exactly once over all ranks, so ranks may
  differ by one image (and, rarely, one batch).

In-memory sets (Fashion-MNIST) take a whole batch with one indexing operation in this process;
file sets are decoded by DataLoader worker processes when ``workers`` > 0. An unreadable image
is dropped from its batch and counted in ``Batch.skipped``; a batch keeps its place in the epoch
even then, so step numbers stay aligned with batch numbers (a batch may thus hold fewer images,
or, if all of its files are bad, none).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pretextlab.data.crops import CropRequest, DecodePlan
from pretextlab.data.folder import FolderImageSet, PlannedFolderImages
from pretextlab.data.imageset import ImageSet, TensorImageSet
from pretextlab.errors import PretextlabError

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """Decoded images of one batch. ``images`` may be a read-only broadcast view (gray data)."""

    images: torch.Tensor  # uint8 (B, 3, S, S)
    labels: torch.Tensor  # int64 (B,)
    skipped: int = 0  # images dropped from this batch as unreadable
    # Rows of ``images`` per label: 1, or a DecodePlan's copies (Exemplar's crops cut at decode
    # time, copy j of image i at row copies * i + j).
    copies: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> "Batch":
        """Page-locked copies, for asynchronous host-to-GPU copies (DataLoader calls this)."""
        return Batch(self.images.contiguous().pin_memory(), self.labels.pin_memory(), self.skipped, self.copies)


def collate_decoded(items: list[tuple[torch.Tensor, int] | None], image_size: int, copies: int = 1) -> Batch:
    """Stack the decoded images of a batch, dropping (and counting) the unreadable ones; items of
    ``copies`` > 1 views, (copies, 3, S, S) each, become ``copies`` consecutive rows."""
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        return Batch(empty, torch.zeros(0, dtype=torch.int64), skipped, copies)
    images = torch.stack([image for image, _ in good])
    if images.ndim == 5:  # (B, copies, 3, S, S) from an inception DecodePlan
        images = images.flatten(0, 1)
    return Batch(images, torch.tensor([label for _, label in good], dtype=torch.int64), skipped, copies)


def _planned_batch(decoded: tuple[torch.Tensor, torch.Tensor, int], copies: int) -> Batch:
    """A batch ``PlannedFolderImages.__getitems__`` already decoded into one tensor, as a ``Batch``."""
    images, labels, skipped = decoded
    return Batch(images, labels, skipped, copies)


def _check_sharding(batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PretextlabError(f"the batch size (--batch-size) must be a whole number >= 1, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise PretextlabError(
            f"the process rank must lie in [0, WORLD_SIZE) and WORLD_SIZE >= 1 (as torchrun sets them), got RANK={rank}, "
            f"WORLD_SIZE={world_size}"
        )


def batches_per_epoch(num_images: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Batches one epoch yields on rank 0 (every rank when ``drop_last``; else the most any rank gets)."""
    _check_sharding(batch_size, 0, world_size)
    if drop_last:
        return (num_images // world_size) // batch_size
    return math.ceil(math.ceil(num_images / world_size) / batch_size)


def epoch_order(num_images: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits all images: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(num_images, dtype=np.int64)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(num_images)


@dataclass(frozen=True, kw_only=True)
class BatchOrder:
    """Which images this rank's batches of one epoch hold, from ``start_batch`` on: the one list of
    the order options ``shard_batches`` and ``BatchLoader`` take (see the module docstring)."""

    shuffle: bool
    seed: int = 0
    epoch: int = 0
    start_batch: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def batches(self, num_images: int, batch_size: int) -> list[np.ndarray]:
        """The index arrays of the batches this rank yields in this epoch, from ``start_batch`` on."""
        _check_sharding(batch_size, self.rank, self.world_size)
        order = epoch_order(num_images, self.shuffle, self.seed, self.epoch)
        if self.drop_last:
            order = order[: (num_images // self.world_size) * self.world_size]
        mine = order[self.rank :: self.world_size]
        total = len(mine) // batch_size if self.drop_last else math.ceil(len(mine) / batch_size)
        start = self.start_batch
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= total:
            raise PretextlabError(f"start_batch must lie in [0, {total}] (the batches of this epoch on this rank), got {start!r}")
        return [mine[i * batch_size : (i + 1) * batch_size] for i in range(start, total)]


def shard_batches(num_images: int, batch_size: int, **order: Any) -> list[np.ndarray]:
    """``BatchOrder(**order).batches(num_images, batch_size)``: ``order`` takes BatchOrder's fields."""
    return BatchOrder(**order).batches(num_images, batch_size)


class BatchLoader:
    """One epoch of ``Batch``es of ``images`` from ``start_batch`` on (see the module docstring for
    order, resume and sharding); ``order`` takes BatchOrder's fields; ``len()`` is how many it yields."""

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        workers: int = 0,
        pin_memory: bool = False,
        plan: DecodePlan | None = None,
        **order: Any,
    ) -> None:
        batch_order = BatchOrder(**order)
        if plan is not None and not isinstance(images, FolderImageSet):
            raise PretextlabError(
                "crops cut while decoding (--crop-source full-image) need image files (--dataset folder); "
                "in-memory datasets such as fashion-mnist use --crop-source center-square"
            )
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
            raise PretextlabError(f"--workers must be a whole number of decoding processes >= 0, got {workers!r}")
        self.images = images
        self.workers = int(workers)
        # Pinning needs CUDA; asking for it elsewhere is harmless, so it quietly does nothing.
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.batches = batch_order.batches(len(images), batch_size)
        self.plan, self.seed, self.epoch = plan, int(batch_order.seed), int(batch_order.epoch)
        self.rank, self.start_batch = int(batch_order.rank), int(batch_order.start_batch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return iter(())
        if isinstance(self.images, TensorImageSet):
            return self._in_memory()
        return self._decoded()

    def _requests(self) -> list[list[CropRequest]]:
        """Each batch's images as crop requests: the batch number counts from the epoch's start, so
        a loader resumed at ``start_batch`` asks for the same crops as the uninterrupted one."""
        return [
            [CropRequest(int(index), self.epoch, self.start_batch + number, self.rank, position) for position, index in enumerate(batch)]
            for number, batch in enumerate(self.batches)
        ]

    def _decoded(self) -> Iterator[Batch]:
        if self.plan is None:
            dataset, sampler = self.images, self.batches
            collate = functools.partial(collate_decoded, image_size=self.images.image_size)
        else:
            assert isinstance(self.images, FolderImageSet)
            # PlannedFolderImages.__getitems__ decodes each batch into one tensor; collation only names it.
            dataset, sampler = PlannedFolderImages(self.images, self.plan, self.seed), self._requests()
            collate = functools.partial(_planned_batch, copies=self.plan.copies if self.plan.mode == "inception" else 1)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            # Workers only decode; more than a few batches in flight only costs memory.
            prefetch_factor=4 if self.workers else None,
        )
        skipped = read = 0
        for batch in loader:
            skipped += batch.skipped
            read += len(batch) + batch.skipped
            yield batch
        if skipped:
            # One total per pass, after the per-file warnings (folder.py), so a reader need not count them.
            logger.warning("skipped %d unreadable images of the %d read in this pass (each named above)", skipped, read)

    def _in_memory(self) -> Iterator[Batch]:
        assert isinstance(self.images, TensorImageSet)
        for indices in self.batches:
            images, labels = self.images.take(indices)
            batch = Batch(images, labels, 0)
            yield batch.pin_memory() if self.pin_memory else batch
