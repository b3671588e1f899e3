"""Data: datasets by name (``load_dataset``), their splits, few-label subsets and the decode-only loader.

Sources are Fashion-MNIST's idx files and an ImageNet/Places205-style folder; the loader resumes
exactly and only decodes (``augment`` runs on the training device).

    splits = load_dataset("fashion-mnist", image_size=32)
    for batch in BatchLoader(splits.train, 256, shuffle=True, epoch=3, start_batch=10):
        batch.images  # uint8 (B, 3, 32, 32); batch.labels int64 (B,); batch.skipped int
"""

from __future__ import annotations

import os

import numpy as np

from pretextlab.data import fashion_mnist, folder
from pretextlab.data.crops import CROP_SOURCES, DecodePlan
from pretextlab.data.imageset import ImageSet, TensorImageSet
from pretextlab.data.loader import Batch, BatchLoader, batches_per_epoch, epoch_order
from pretextlab.data.splits import DatasetSplits, SplitIndices, few_label_subset, label_budget_tag, split_indices
from pretextlab.errors import PretextlabError

DATASETS = ("fashion-mnist", "folder")

__all__ = [
    "CROP_SOURCES",
    "DATASETS",
    "DecodePlan",
    "Batch",
    "BatchLoader",
    "DatasetSplits",
    "SplitIndices",
    "ImageSet",
    "TensorImageSet",
    "batches_per_epoch",
    "epoch_order",
    "few_label_subset",
    "label_budget_tag",
    "split_indices",
    "load_dataset",
]


def _load_fashion_mnist(data_dir: str | None, image_size: int, settings: dict, download: bool) -> DatasetSplits:
    source = fashion_mnist.locate_fashion_mnist(data_dir, download=download)
    arrays = fashion_mnist.read_fashion_mnist(source)
    indices = split_indices(arrays.train_labels, arrays.test_labels, **settings)
    # Resize only the images some split uses (the pool under --limit), once, and keep them in memory.
    pool = np.union1d(indices.train, indices.val)
    pool_set = fashion_mnist.image_set(arrays.train_images[pool], arrays.train_labels[pool], image_size)
    test_set = fashion_mnist.image_set(arrays.test_images[indices.test], arrays.test_labels[indices.test], image_size)
    return DatasetSplits(
        name="fashion-mnist",
        train=pool_set.subset(np.searchsorted(pool, indices.train)),
        val=pool_set.subset(np.searchsorted(pool, indices.val)),
        test=test_set,
        num_classes=len(fashion_mnist.CLASS_NAMES),
        image_size=image_size,
        source=str(source),
        settings=settings,
        fingerprint=indices.fingerprint(),
    )


def _load_folder(data_dir: str | None, image_size: int, settings: dict) -> DatasetSplits:
    if not data_dir:
        raise PretextlabError(
            f"the folder dataset needs --data-dir ROOT, with ROOT/{folder.TRAIN_DIR}/<class>/* and "
            f"ROOT/{folder.TEST_DIR}/<class>/* (the ImageNet/Places205 layout)"
        )
    root = os.path.expanduser(data_dir)
    train_scan = folder.scan_split(root, folder.TRAIN_DIR)
    test_scan = folder.scan_split(root, folder.TEST_DIR, class_names=train_scan.class_names)
    indices = split_indices(train_scan.labels, test_scan.labels, **settings)
    pool = folder.FolderImageSet.from_scan(train_scan, image_size)
    return DatasetSplits(
        name="folder",
        train=pool.subset(indices.train),
        val=pool.subset(indices.val),
        test=folder.FolderImageSet.from_scan(test_scan, image_size).subset(indices.test),
        num_classes=len(train_scan.class_names),
        image_size=image_size,
        source=str(os.path.abspath(root)),
        settings=settings,
        fingerprint=indices.fingerprint(),
    )


def load_dataset(
    name: str,
    data_dir: str | None = None,
    image_size: int = 32,
    val_size: int | float | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> DatasetSplits:
    """A dataset's train / held-out val / test splits, decoded to uint8 (3, image_size, image_size).

    ``limit`` cuts the training pool to a class-balanced N images *before* the validation split is
    held out of it (so train + val = N); ``val_size`` is a count or a fraction of that pool (default:
    50,000 if the pool has >= 500,000 images, else 10%); ``test_limit`` takes a class-balanced subset
    of the official test set. All splits are a deterministic function of the labels and ``seed``.
    """
    if name not in DATASETS:
        raise PretextlabError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise PretextlabError(f"the image size (--image-size) must be a whole number of pixels >= 1, got {image_size!r}")
    settings = {"val_size": val_size, "limit": limit, "test_limit": test_limit, "seed": int(seed)}
    if name == "fashion-mnist":
        return _load_fashion_mnist(data_dir, int(image_size), settings, download)
    return _load_folder(data_dir, int(image_size), settings)
