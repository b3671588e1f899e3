"""One split of a dataset as decoded uint8 images: the common interface and the in-memory kind.

An ``ImageSet`` yields ``(image, label)`` with ``image`` a uint8 tensor of shape (3, S, S), or
``None`` for an image that cannot be decoded (the loader drops it and counts it). Nothing random
happens here: augmentation runs later, on whole batches, on the training device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pretextlab.errors import PretextlabError


def as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, length: int, what: str = "index") -> np.ndarray:
    """Validate ``indices`` into a sequence of ``length`` items; returns an int64 array."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise PretextlabError(f"{what} must be a 1-D sequence of integers, got shape {array.shape} of {array.dtype}")
    if array.min() < 0 or array.max() >= length:
        raise PretextlabError(f"{what} out of range: values must lie in [0, {length}), got {array.min()}..{array.max()}")
    return array.astype(np.int64, copy=False)


class ImageSet(Dataset):
    """One split: decoded uint8 images of a fixed square size, with integer labels."""

    labels: np.ndarray  # int64 (N,)
    num_classes: int
    class_names: list[str]
    image_size: int

    def __init__(self, labels: np.ndarray, class_names: Sequence[str], image_size: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``indices`` (in that order), sharing this set's storage where it can."""
        raise NotImplementedError

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, {self.image_size}px)"


class TensorImageSet(ImageSet):
    """Images held in memory as one uint8 tensor (N, C, S, S), C = 1 (gray) or 3.

    Gray images are stored once and broadcast to 3 channels with ``expand`` (a view, no copy), so
    what this set returns may be a read-only broadcast view: copy it before writing into it in place.
    A subset keeps the parent's tensor and a row index, so splits and few-label subsets cost nothing.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: np.ndarray,
        class_names: Sequence[str],
        rows: np.ndarray | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
            raise PretextlabError(
                f"in-memory images must be a uint8 tensor (N, 1 or 3, S, S), got {tuple(images.shape)} {images.dtype}"
            )
        self._images = images
        self._rows = np.arange(len(images), dtype=np.int64) if rows is None else rows
        all_labels = np.asarray(labels, dtype=np.int64)
        if len(all_labels) != len(images):
            raise PretextlabError(f"{len(images)} images but {len(all_labels)} labels")
        self._all_labels = all_labels
        super().__init__(all_labels[self._rows], class_names, images.shape[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = int(self._rows[index])
        return self._images[row].expand(3, -1, -1), int(self._all_labels[row])

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: uint8 (B, 3, S, S) (possibly a broadcast view) and int64 labels (B,)."""
        rows = torch.from_numpy(self._rows[indices])
        images = self._images.index_select(0, rows).expand(-1, 3, -1, -1)
        return images, torch.from_numpy(self._all_labels[rows.numpy()])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TensorImageSet":
        chosen = as_indices(indices, len(self), "subset indices")
        return TensorImageSet(self._images, self._all_labels, self.class_names, rows=self._rows[chosen])
