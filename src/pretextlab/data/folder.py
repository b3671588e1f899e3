"""ImageNet / Places205 layout on disk: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

Any file whose extension Pillow knows is an image candidate; it is decoded (any mode: RGB, gray,
palette, CMYK, 16-bit, with or without alpha) to RGB, its shorter side resized to S and the centre
S x S cut out, as a uint8 (3, S, S) tensor. A file that cannot be decoded (corrupt, truncated,
zero bytes, not an image) is logged once, with its path, and returned as ``None``: the loader drops
it and counts it, and training goes on.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from pretextlab.data.crops import CropBox, CropRequest, DecodePlan, crop_rng, sample_crop_box
from pretextlab.data.decode import decode_box, decode_boxes, to_rgb
from pretextlab.data.imageset import ImageSet, as_indices
from pretextlab.errors import PretextlabError

logger = logging.getLogger(__name__)

TRAIN_DIR = "train"
TEST_DIR = "val"  # the official validation set, which the study uses as its test set


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open (.jpg, .jpeg, .png, .webp, .tif, ...)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class FolderScan:
    """The image files of one split folder, in a fixed (sorted) order."""

    root: Path  # the split folder, e.g. ROOT/train
    relative_paths: np.ndarray  # bytes (numpy 'S'): compact, and shared without copies by forked workers
    labels: np.ndarray  # int64
    class_names: list[str]
    ignored_files: int  # files whose extension is not an image format
    skipped_links: tuple[str, ...] = ()  # folder symlinks not followed (already scanned), relative to the split folder


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path, extensions: frozenset[str], visited: set[str], skipped_links: list[str]) -> tuple[list[str], int]:
    """Image files under ``class_dir``, following directory symlinks but never into a folder
    already seen (``visited``: real paths, shared over the split), so a loop (``ln -s . loop``) or
    a link to another class's folder cannot count an image twice; such links go to ``skipped_links``."""
    found, ignored = [], 0
    for folder, subfolders, files in os.walk(class_dir, followlinks=True):
        keep = []
        for name in sorted(d for d in subfolders if not d.startswith(".")):
            real = os.path.realpath(os.path.join(folder, name))
            if real in visited:
                skipped_links.append(os.path.relpath(os.path.join(folder, name), class_dir.parent))
                continue
            visited.add(real)
            keep.append(name)
        subfolders[:] = keep
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.relpath(os.path.join(folder, name), class_dir.parent))
            else:
                ignored += 1
    return sorted(found), ignored


def scan_split(root: str | os.PathLike, split: str, class_names: Sequence[str] | None = None, progress: bool = True) -> FolderScan:
    """List ``root/split/<class>/*`` images. With ``class_names`` (the train split's), labels follow
    that list; every class folder found must be one of them, and may be missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PretextlabError(
            f"dataset root {root} does not exist or is not a folder: pass --data-dir ROOT with "
            f"ROOT/{TRAIN_DIR}/<class>/* and ROOT/{TEST_DIR}/<class>/* (the ImageNet/Places205 layout)"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise PretextlabError(
            f"{root} has no {split}/ folder: a folder dataset needs ROOT/{TRAIN_DIR}/<class>/* and "
            f"ROOT/{TEST_DIR}/<class>/* (the official validation images, used as the test set)"
        )
    folders = _class_folders(split_dir)
    if not folders:
        raise PretextlabError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
    if class_names is None:
        class_names = folders
    else:
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise PretextlabError(
                f"{split_dir} has class folders that {TRAIN_DIR}/ lacks: {', '.join(unknown[:10])}"
                f"{' ...' if len(unknown) > 10 else ''}; both splits must use the same class folder names"
            )
    label_of = {name: i for i, name in enumerate(class_names)}
    extensions = image_extensions()
    paths: list[str] = []
    labels: list[np.ndarray] = []
    ignored = 0
    # Every class folder (and the split folder) counts as seen before the walk, so a symlink from
    # one class into another class's folder, or up to the split, is skipped rather than relabelled.
    visited: dict[str, str] = {os.path.realpath(split_dir): split}
    for name in folders:
        real = os.path.realpath(split_dir / name)
        if real in visited:
            raise PretextlabError(
                f"class folders {split_dir / visited[real]} and {split_dir / name} are the same folder (one is a "
                f"symlink to the other), so its images would get two labels: remove one of them"
            )
        visited[real] = name
    seen = set(visited)
    skipped_links: list[str] = []
    for name in tqdm(folders, desc=f"scanning {split_dir}", unit="class", disable=not progress, leave=False):
        files, skipped = _image_files(split_dir / name, extensions, seen, skipped_links)
        ignored += skipped
        if not files:
            raise PretextlabError(
                f"class folder {split_dir / name} holds no images: remove it or add its images "
                f"(files with an extension Pillow reads, e.g. .jpg, .png)"
            )
        paths.extend(files)
        labels.append(np.full(len(files), label_of[name], dtype=np.int64))
    if ignored:
        logger.warning("%s: ignored %d files whose extension is not an image format", split_dir, ignored)
    if skipped_links:
        shown = ", ".join(skipped_links[:5]) + (f" and {len(skipped_links) - 5} more" if len(skipped_links) > 5 else "")
        logger.warning(
            "%s: did not follow %d folder symlinks to folders already scanned (a loop, or a second path to the "
            "same images, whose images would count twice): %s", split_dir, len(skipped_links), shown,
        )
    return FolderScan(
        root=split_dir,
        relative_paths=np.array([os.fsencode(p) for p in paths]),
        labels=np.concatenate(labels),
        class_names=list(class_names),
        ignored_files=ignored,
        skipped_links=tuple(skipped_links),
    )


def decode_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Decode one file to uint8 (3, size, size): shorter side to ``size``, centre crop. Raises on bad files."""
    with Image.open(path) as image:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale while both sides stay >= size (much faster).
        image.draft("RGB", (size, size))
        image = to_rgb(image)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) / 2.0, (height - side) / 2.0
        # Resizing only the central square equals "shorter side to S, then centre crop", in one pass.
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_planned(
    path: str | os.PathLike, plan: DecodePlan, seed: int, request: CropRequest, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The views ``plan`` asks for of one file, decoded once: (3, S, S) for ``squash``, (copies, 3,
    S, S) for ``inception`` (each copy's box from ``crops.crop_rng``, so it depends on nothing but
    the request). ``out``: (views, 3, S, S) rows of a batch to write them into (returned as they are)."""
    if plan.mode == "squash":
        if out is not None:
            return decode_boxes(path, lambda h, w: [CropBox(0, 0, h, w)], plan.size, resize=plan.resize, out=out)
        return decode_box(path, lambda h, w: CropBox(0, 0, h, w), plan.size, resize=plan.resize)

    def boxes(height: int, width: int) -> list[CropBox]:
        return [
            sample_crop_box(crop_rng(seed, request.epoch, request.batch, request.rank, request.position, copy), height, width, plan.crop)
            for copy in range(plan.copies)
        ]

    return decode_boxes(path, boxes, plan.size, resize=plan.resize, out=out)


class FolderImageSet(ImageSet):
    """Image files decoded on access (in DataLoader worker processes when ``workers`` > 0)."""

    def __init__(self, root: Path, relative_paths: np.ndarray, labels: np.ndarray, class_names: Sequence[str], image_size: int) -> None:
        super().__init__(labels, class_names, image_size)
        if len(relative_paths) != len(self.labels):
            raise PretextlabError(f"{len(relative_paths)} files but {len(self.labels)} labels")
        self.root = Path(root)
        self.relative_paths = relative_paths

    @classmethod
    def from_scan(cls, scan: FolderScan, image_size: int) -> "FolderImageSet":
        return cls(scan.root, scan.relative_paths, scan.labels, scan.class_names, image_size)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.relative_paths[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path = self.path(int(index))
        try:
            image = decode_image(path, self.image_size)
        except Exception as error:  # Pillow raises many types for bad files; none may stop training
            logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)
            return None
        return image, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "FolderImageSet":
        chosen = as_indices(indices, len(self), "subset indices")
        return FolderImageSet(self.root, self.relative_paths[chosen], self.labels[chosen], self.class_names, self.image_size)


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a DataLoader worker process, in shared memory from the
    start (as torch's default_collate allocates its batch), so sending the batch to the training
    process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class PlannedFolderImages(Dataset):
    """``images`` decoded as ``plan`` says, one ``CropRequest`` per item (the loader's batch
    sampler yields them); an unreadable file gives ``None``, as ``FolderImageSet`` does.
    ``__getitems__`` (what DataLoader calls for a whole batch) decodes every file straight into one
    batch tensor: no per-file tensor, no stacking copy."""

    def __init__(self, images: FolderImageSet, plan: DecodePlan, seed: int) -> None:
        self.images, self.plan, self.seed = images, plan, int(seed)
        # Plain strings: joining them costs a fraction of building a pathlib.Path per file.
        self._root = os.fspath(images.root)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, request: CropRequest) -> tuple[torch.Tensor, int] | None:
        path = self.images.path(request.index)
        try:
            views = decode_planned(path, self.plan, self.seed, request)
        except Exception as error:  # Pillow raises many types for bad files; none may stop training
            logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)
            return None
        return views, int(self.images.labels[request.index])

    def __getitems__(self, requests: Sequence[CropRequest]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A batch: (uint8 (n * views, 3, S, S) images, int64 (n,) labels, files skipped), the
        readable files in request order, copy j of the k-th at row views * k + j; the same pixels
        as ``__getitem__`` per file. An unreadable file is logged and its rows reused by the next."""
        views = self.plan.copies if self.plan.mode == "inception" else 1
        size, relative, labels = self.plan.size, self.images.relative_paths, self.images.labels
        images = _batch_buffer((len(requests) * views, 3, size, size))
        kept: list[int] = []
        for request in requests:
            path = os.path.join(self._root, os.fsdecode(relative[request.index]))
            row = len(kept) * views
            try:
                decode_planned(path, self.plan, self.seed, request, out=images[row : row + views])
            except Exception as error:  # Pillow raises many types for bad files; none may stop training
                logger.warning("skipped unreadable image %s (%s: %s)", path, type(error).__name__, error)
                continue
            kept.append(request.index)
        return images[: len(kept) * views], torch.from_numpy(labels[np.asarray(kept, dtype=np.int64)]), len(requests) - len(kept)
