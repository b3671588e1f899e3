"""What the loader cuts out of each image file, decided before the file is decoded.

The study's training crops come from the whole image at full resolution (docs/protocol.md,
"Preprocessing for training"):

- Rotation and Exemplar: slim's ``distorted_bounding_box_crop`` (released code,
  config/rotation/imagenet.sh:31 ``inception_preprocess`` and config/exemplar/imagenet.sh:32
  ``crop_inception_preprocess_patches``, both calling slim's inception_preprocessing.py
  ``preprocess_for_train`` -> ``distorted_bounding_box_crop(min_object_covered=0.1,
  aspect_ratio_range=(0.75, 1.33), area_range=(0.05, 1.0), max_attempts=100)``), then a resize to
  the network input, aspect not kept;
- Jigsaw and Relative Patch Location: the whole image resized to 292x292, aspect not kept
  (released code, config/jigsaw/imagenet.sh:32-34 ``resize`` with ``--resize_size 292,292``; the
  255 crop and the patches are cut later, on the device).

So the box is sampled here, in the loader worker, from a pure function of (seed, epoch, batch,
rank, position in the batch, copy): resume replays the same crops, and the JPEG can be decoded at
the DCT scale (1/2, 1/4, 1/8) that still leaves the *crop* at least as large as the output
(data/decode.py). Flips, colour and rotations stay on the batched device ops (``augment``).

``center-square`` (the shorter side to S, the central S x S; folder.py ``decode_image``) is the
other crop source: evaluation always uses it, and training uses it with ``--crop-source
center-square`` (the behaviour of runs recorded before the option existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from pretextlab.errors import PretextlabError

CROP_SOURCES = ("full-image", "center-square")
# Decode modes of a DecodePlan: a random inception box per copy, or the whole image squashed.
DECODE_MODES = ("inception", "squash")
# How a box becomes S x S (data/decode.py): "crop-then-resize" resizes the box's own pixels, as the
# released code does (slim's tf.slice, then tf.image.resize_images); "pillow-box" is Pillow's
# resize(box=...), whose filter also reads pixels just outside the box: the crops of runs recorded
# before the option existed (config.LEGACY_VALUES).
RESIZE_MODES = ("crop-then-resize", "pillow-box")

# slim inception_preprocessing.py distorted_bounding_box_crop's defaults, which preprocess_for_train
# uses unchanged (the released configs pass no box and no ranges).
SLIM_AREA_RANGE = (0.05, 1.0)
SLIM_ASPECT_RANGE = (0.75, 1.33)
SLIM_MIN_OBJECT_COVERED = 0.1
SLIM_MAX_ATTEMPTS = 100

# Tags the crop stream apart from every other stream drawn from the run's seed.
_CROP_STREAM = 0x6372_6F70  # "crop"


class CropBox(NamedTuple):
    """A box in pixels of the full-resolution image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class InceptionCrop:
    """The constraints of TF's ``sample_distorted_bounding_box`` with the whole image as the only box."""

    area_range: tuple[float, float] = SLIM_AREA_RANGE
    aspect_range: tuple[float, float] = SLIM_ASPECT_RANGE
    min_object_covered: float = SLIM_MIN_OBJECT_COVERED
    attempts: int = SLIM_MAX_ATTEMPTS


def _generate_box(rng: np.random.Generator, height: int, width: int, min_area: float, max_area: float, aspect: float) -> CropBox | None:
    """One attempt of TF's ``GenerateRandomCrop`` (sample_distorted_bounding_box_op.cc): draw the
    height between the heights that give the min and max area at this aspect, round the width, nudge
    the height by one pixel if rounding left the area outside its range, else give up (None)."""
    crop_h = int(round(math.sqrt(min_area / aspect)))
    max_h = int(round(math.sqrt(max_area / aspect)))
    if round(max_h * aspect) > width:
        max_h = int((width + 0.5 - 1e-7) / aspect)
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += int(rng.integers(0, max_h - crop_h + 1))
    crop_w = int(round(crop_h * aspect))
    if crop_w * crop_h < min_area:
        crop_h += 1
        crop_w = int(round(crop_h * aspect))
    if crop_w * crop_h > max_area:
        crop_h -= 1
        crop_w = int(round(crop_h * aspect))
    area = crop_w * crop_h
    if area < min_area or area > max_area or not 0 < crop_w <= width or not 0 < crop_h <= height:
        return None
    # Every offset that keeps the box inside the image, both ends included, so the boxes reach
    # every edge and corner.
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return CropBox(top, left, crop_h, crop_w)


def sample_crop_box(rng: np.random.Generator, height: int, width: int, spec: InceptionCrop = InceptionCrop()) -> CropBox:
    """slim's ``distorted_bounding_box_crop`` box for an image of ``height`` x ``width`` pixels.

    Each of ``spec.attempts`` draws takes an aspect ratio (width / height) uniform in the range and
    an area in the area range; a box must also cover ``min_object_covered`` of the only object box,
    the whole image (so with slim's numbers no box is under 10% of the image). After that many
    failures: the whole image.
    """
    if height < 1 or width < 1:
        raise PretextlabError(f"cannot crop an image of {width}x{height} pixels")
    image_area = float(height * width)
    min_area = spec.area_range[0] * image_area
    max_area = spec.area_range[1] * image_area
    for _ in range(spec.attempts):
        aspect = float(rng.uniform(spec.aspect_range[0], spec.aspect_range[1]))
        box = _generate_box(rng, height, width, min_area, max_area, aspect)
        if box is not None and box.height * box.width >= spec.min_object_covered * image_area:
            return box
    return CropBox(0, 0, height, width)


def crop_rng(seed: int, epoch: int, batch: int, rank: int, position: int, copy: int = 0) -> np.random.Generator:
    """The generator of one crop: a pure function of where the image sits in the run, so a resumed
    run (or another number of loader workers) cuts the same boxes."""
    entropy = [_CROP_STREAM, seed, epoch, batch, rank, position, copy]
    if all(0 <= int(value) < 2**32 for value in entropy):
        # The same 32-bit words numpy makes of the list (one per value below 2**32, so the same
        # stream), handed over as an array: SeedSequence converts a list of Python ints in Python
        # code, ~4x the cost of the rest of a box (measured in the loader, benchmarks/README.md).
        return np.random.default_rng(np.random.SeedSequence(np.array(entropy, dtype=np.uint32)))
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class DecodePlan:
    """How the loader decodes a task's training images instead of the centre square.

    ``inception``: ``copies`` independent boxes per image (Rotation 1, Exemplar 8), each resized to
    ``size`` x ``size``; the batch's images are (B * copies, 3, size, size), copy j of image i at row
    ``copies * i + j``. ``squash``: the whole image resized to ``size`` x ``size`` (aspect not kept).
    """

    mode: str
    size: int
    copies: int = 1
    crop: InceptionCrop = InceptionCrop()
    resize: str = RESIZE_MODES[0]

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise PretextlabError(f"unknown decode mode {self.mode!r}: choose one of {', '.join(DECODE_MODES)}")
        if self.resize not in RESIZE_MODES:
            raise PretextlabError(f"unknown crop resize {self.resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.size < 1 or self.copies < 1:
            raise PretextlabError(f"a decode plan needs size >= 1 and copies >= 1, got {self.size} and {self.copies}")
        if self.mode == "squash" and self.copies != 1:
            raise PretextlabError("a squash decode plan makes one view per image (copies=1)")


def with_resize(plan: DecodePlan | None, resize: str | None) -> DecodePlan | None:
    """A task's plan with the run's ``crop_resize`` (None: the plan's own); no plan stays none."""
    return plan if plan is None or resize is None else replace(plan, resize=resize)


@dataclass(frozen=True)
class CropRequest:
    """What a loader worker decodes for one image: its index, and where it sits in the run (the
    crop's random stream)."""

    index: int
    epoch: int
    batch: int
    rank: int
    position: int
