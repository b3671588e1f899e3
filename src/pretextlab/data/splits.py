"""The study's splits, computed from labels alone, deterministically from a seed.

- ``limit`` (optional) first cuts the training pool to a class-balanced subset of N images;
- the validation split is then held out of that pool, class-stratified: its size is a count, or a
  fraction of the pool; by default 50,000 images when the pool has >= 500,000 images (as the study
  does on ImageNet and Places205), else 10%;
- the official validation/test set is the test split (``test_limit``: a class-balanced subset of it);
- ``few_label_subset`` picks a class-balanced labelled subset of the training split.

Every choice draws from a per-class random order fixed by (seed, purpose), and takes its first
images: so for one seed, a smaller subset is always contained in a larger one (nested), and a split
never depends on the image size, the machine or the number of workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pretextlab.data.imageset import ImageSet
from pretextlab.errors import PretextlabError

LARGE_POOL = 500_000  # from this many training images on, the held-out validation is a fixed count
LARGE_POOL_VAL = 50_000  # the study's held-out validation size on ImageNet / Places205
SMALL_POOL_VAL_FRACTION = 0.1

# Separate random streams per purpose, so that e.g. changing --limit does not reshuffle few-label picks.
_PURPOSE_LIMIT, _PURPOSE_VAL, _PURPOSE_TEST_LIMIT, _PURPOSE_FEW_LABELS = 1, 2, 3, 4


def _labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0)):
        raise PretextlabError(f"labels must be a 1-D array of non-negative integers, got shape {array.shape} of {array.dtype}")
    return array.astype(np.int64, copy=False)


def class_ranks(labels: np.ndarray, seed: int, purpose: int) -> np.ndarray:
    """``ranks[i]``: the position of image i in its class's random order for (seed, purpose)."""
    labels = _labels(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), purpose]))
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, random within class
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    return ranks


def _first_per_class(labels: np.ndarray, ranks: np.ndarray, per_class: np.ndarray) -> np.ndarray:
    """Sorted indices of the first ``per_class[c]`` images of each class c in the ranked order."""
    return np.flatnonzero(ranks < per_class[labels])


def stratified_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder): each class gets
    floor or ceil of its exact share, and the counts sum to ``total``."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = total * counts / max(int(counts.sum()), 1)
    chosen = np.floor(exact).astype(np.int64)
    missing = int(total - chosen.sum())
    # Ties go to the lower class id (stable sort), so the result is fully determined by the counts.
    chosen[np.argsort(-(exact - chosen), kind="stable")[:missing]] += 1
    return chosen


def balanced_counts(counts: np.ndarray, total: int, seed: int, purpose: int) -> np.ndarray:
    """Split ``total`` as evenly as possible over classes, never above a class's ``counts``
    (water-filling); the few classes that get one extra image are chosen at random for the seed."""
    counts = np.asarray(counts, dtype=np.int64)
    if total > counts.sum():
        raise PretextlabError(f"cannot take {total} images from {int(counts.sum())}")
    chosen = np.zeros_like(counts)
    remaining = int(total)
    tie_order = np.random.default_rng(np.random.SeedSequence([int(seed), purpose, 1])).permutation(len(counts))
    while remaining > 0:
        open_classes = np.flatnonzero(chosen < counts)
        share = remaining // len(open_classes)
        if share == 0:
            extra = [c for c in tie_order if chosen[c] < counts[c]][:remaining]
            chosen[extra] += 1
            break
        added = np.minimum(share, counts[open_classes] - chosen[open_classes])
        chosen[open_classes] += added
        remaining -= int(added.sum())
    return chosen


def balanced_subset(labels: np.ndarray, total: int, seed: int, purpose: int = _PURPOSE_LIMIT) -> np.ndarray:
    """Sorted indices of a deterministic class-balanced subset of ``total`` images."""
    labels = _labels(labels)
    per_class = balanced_counts(np.bincount(labels), total, seed, purpose)
    return _first_per_class(labels, class_ranks(labels, seed, purpose), per_class)


def resolve_val_count(val_size: int | float | None, pool: int) -> int:
    """The number of held-out validation images for a training pool of ``pool`` images."""
    if val_size is None:
        count = LARGE_POOL_VAL if pool >= LARGE_POOL else round(SMALL_POOL_VAL_FRACTION * pool)
        count = max(count, 1)
    elif isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise PretextlabError(f"--val-size must be a count of images (>= 1) or a fraction in (0, 1), got {val_size!r}")
    elif 0 < val_size < 1:
        count = max(1, round(float(val_size) * pool))
    elif val_size >= 1 and float(val_size).is_integer():
        count = int(val_size)
    else:
        raise PretextlabError(f"--val-size must be a count of images (>= 1) or a fraction in (0, 1), got {val_size!r}")
    if count >= pool:
        raise PretextlabError(
            f"a validation split of {count} images leaves nothing to train on (the training pool has {pool}): "
            "lower --val-size or raise --limit"
        )
    return count


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the official training set (train, val) and the official test set (test)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            digest.update(np.int64(len(part)).tobytes())
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


def _check_limit(value: int | None, available: int, what: str) -> None:
    """``what`` is the flag the user typed (``--limit``, ``--test-limit``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PretextlabError(f"{what} must be a whole number of images >= 1, got {value!r}")
    if value > available:
        raise PretextlabError(f"{what} {value} is more than the {available} images there are: lower it or leave it out")


def split_indices(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    val_size: int | float | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> SplitIndices:
    """The study's splits (see the module docstring) as sorted index arrays."""
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    _check_limit(limit, len(train_labels), "--limit")
    _check_limit(test_limit, len(test_labels), "--test-limit")
    pool = np.arange(len(train_labels)) if limit is None else balanced_subset(train_labels, limit, seed, _PURPOSE_LIMIT)
    pool_labels = train_labels[pool]
    val_count = resolve_val_count(val_size, len(pool))
    per_class = stratified_counts(np.bincount(pool_labels), val_count)
    held_out = np.zeros(len(pool), dtype=bool)
    held_out[_first_per_class(pool_labels, class_ranks(pool_labels, seed, _PURPOSE_VAL), per_class)] = True
    test = np.arange(len(test_labels)) if test_limit is None else balanced_subset(test_labels, test_limit, seed, _PURPOSE_TEST_LIMIT)
    return SplitIndices(train=pool[~held_out], val=pool[held_out], test=test)


def label_budget_tag(per_class: int | None, fraction: float | None) -> str:
    """How a label budget is named in result files and store rows: "100pc", "0.1frac" or "all"."""
    if per_class is not None:
        return f"{per_class}pc"
    if fraction is not None:
        return f"{fraction:g}frac"
    return "all"


def few_label_subset(
    labels: np.ndarray,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices of a class-balanced labelled subset: ``per_class`` images of every class, or
    ``fraction`` of each class's images (at least one). Deterministic for the seed, and nested: for
    one seed a smaller subset is contained in a larger one. ``class_names`` (the folder names, or
    the dataset's) only make the messages name a class as the user knows it."""
    labels = _labels(labels)
    if (per_class is None) == (fraction is None):
        raise PretextlabError("give exactly one of --labels-per-class N or --label-fraction F (of each class's images)")
    counts = np.bincount(labels)
    present = counts > 0
    if per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
            raise PretextlabError(f"--labels-per-class must be a whole number >= 1, got {per_class!r}")
        short = np.flatnonzero(present & (counts < per_class))
        if len(short):
            label = int(short[0])
            name = repr(class_names[label]) if class_names is not None and label < len(class_names) else f"number {label}"
            raise PretextlabError(
                f"--labels-per-class {per_class} asks for more images than class {name} has in the training "
                f"split ({int(counts[label])}): lower --labels-per-class to at most {int(counts[present].min())} "
                f"(the smallest class), or raise --limit"
            )
        wanted = np.where(present, per_class, 0)
    else:
        if not 0 < fraction <= 1:  # type: ignore[operator]
            raise PretextlabError(f"--label-fraction must lie in (0, 1], got {fraction!r}")
        wanted = np.where(present, np.maximum(1, np.floor(counts * float(fraction) + 0.5)), 0).astype(np.int64)
    return _first_per_class(labels, class_ranks(labels, seed, _PURPOSE_FEW_LABELS), wanted)


@dataclass
class DatasetSplits:
    """A dataset's three splits, and how they were made."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    image_size: int = 0
    source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # val_size, limit, test_limit, seed as asked
    fingerprint: str = ""  # of the exact index sets: equal fingerprints mean the same images in each split

    def describe(self) -> dict[str, Any]:
        """Sizes, provenance and settings, JSON-ready and deterministic (usable in cache keys)."""
        return {
            "name": self.name,
            "source": self.source,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "train_per_class": _count_range(self.train),
            "fingerprint": self.fingerprint,
            **self.settings,
        }


def _count_range(images: ImageSet) -> list[int]:
    counts = images.class_counts()
    return [int(counts.min()), int(counts.max())] if len(counts) else [0, 0]

