"""Decoding one image file's crop boxes to uint8 views: libjpeg-turbo through simplejpeg for JPEGs, Pillow otherwise.

Why two decoders (benchmarks/README.md, "Folder loader"): a 500x375 JPEG costs Pillow ~1.15 ms
of CPU to decode and simplejpeg ~0.8 ms: the difference is Pillow's chunked read and its
4-byte-per-pixel unpacking, while simplejpeg calls the same libjpeg-turbo straight into a numpy
array. Both use libjpeg-turbo's defaults (accurate integer DCT, fancy upsampling) at the same DCT
scale (Pillow's ``draft`` rule: 1, 1/2, 1/4 or 1/8), so they give the same pixels and the decoder
is not part of the recipe. libjpeg-turbo's other scales (M/8 with M odd, 3/4) were measured too and
left out: their IDCTs have no SIMD code, so they decode slower than 1/1, and they change the pixels.

The resize of a box to S x S (``DecodePlan.resize``, docs/protocol.md "Preprocessing for
training"): ``crop-then-resize`` cuts the box and resizes its own pixels (bilinear, antialiased), as
the released code does (tf.slice, then resize); a box on whole decoded pixels (always at full scale)
goes through torch's uint8 antialiased bilinear kernel, a port of Pillow's resampling that is ~1.5x
faster here; a box whose edges fall between pixels (after a DCT scale) goes through Pillow's
``resize(box=...)`` on the whole pixels around it, so the crop is never moved by a fraction of a
pixel. ``pillow-box`` is the earlier code exactly (Pillow decodes, Pillow resizes with its filter
reaching past the box's edges): runs recorded before the option resume with the same pixels.
"""

from __future__ import annotations

import io
import math
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pretextlab.data.crops import RESIZE_MODES, CropBox
from pretextlab.errors import PretextlabError

try:  # a declared dependency; without it (a platform with no wheel) every file goes through Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

JPEG_DECODERS = ("simplejpeg", "pillow")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_JPEG_MAGIC = b"\xff\xd8"
# JPEG colour spaces whose RGB libjpeg-turbo makes exactly as Pillow does; CMYK and YCCK files go
# through Pillow, whose CMYK -> RGB rounds differently (measured: +-1 level).
_SAME_AS_PILLOW = ("YCbCr", "Gray")
Region = tuple[float, float, float, float]  # left, top, right, bottom in decoded pixels


def resolve_decoder(decoder: str = "auto") -> str:
    """``auto``: simplejpeg when it is installed, else Pillow; a named decoder must be installed."""
    if decoder == "auto":
        return "simplejpeg" if simplejpeg is not None else "pillow"
    if decoder not in JPEG_DECODERS:
        raise PretextlabError(f"unknown JPEG decoder {decoder!r}: choose auto, {' or '.join(JPEG_DECODERS)}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise PretextlabError("the simplejpeg decoder is not installed: pip install simplejpeg, or use the pillow decoder")
    return decoder


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (gray, palette, CMYK, 16-bit, float, with or without alpha) as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale them instead.
        values = np.asarray(image).astype(np.float32)
        if image.mode == "F":
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB", "1") and "transparency" in image.info):
        # Palette transparency: going through RGBA avoids Pillow's per-image warning.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _needed_size(width: int, height: int, boxes: Sequence[CropBox], size: int) -> tuple[int, int]:
    """The smallest decoded image whose boxes, scaled alike, keep at least ``size`` pixels a side."""
    return max(math.ceil(width * size / b.width) for b in boxes), max(math.ceil(height * size / b.height) for b in boxes)


def _draft_denominator(width: int, height: int, need: tuple[int, int]) -> int:
    """Pillow's JPEG ``draft`` rule (JpegImagePlugin.draft): the largest of 8, 4, 2, 1 that divides
    both sides at least that often, so simplejpeg decodes at the very scale Pillow would."""
    scale = min(width // need[0], height // need[1])
    return next((s for s in (8, 4, 2, 1) if scale >= s), 1)


def _regions(boxes: Sequence[CropBox], width: int, height: int, decoded_w: int, decoded_h: int) -> list[Region]:
    sx, sy = decoded_w / width, decoded_h / height
    return [(b.left * sx, b.top * sy, (b.left + b.width) * sx, (b.top + b.height) * sy) for b in boxes]


def _output(out: torch.Tensor | None, views: int, size: int) -> torch.Tensor:
    """``out`` (rows of a batch the caller allocated once), or a new uint8 (views, 3, size, size)."""
    if out is None:
        return torch.empty((views, 3, size, size), dtype=torch.uint8)
    if out.shape != (views, 3, size, size) or out.dtype != torch.uint8:
        raise PretextlabError(f"decode output must be uint8 {(views, 3, size, size)}, got {out.dtype} {tuple(out.shape)}")
    return out


def _cut_and_resize(pixels: np.ndarray, regions: Sequence[Region], size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``crop-then-resize``: each region of the decoded RGB array, cut out and resized to ``size``
    x ``size``, into ``out`` (or a new tensor): uint8 (len(regions), 3, size, size)."""
    out = _output(out, len(regions), size)
    for i, region in enumerate(regions):
        left, top, right, bottom = math.floor(region[0]), math.floor(region[1]), math.ceil(region[2]), math.ceil(region[3])
        if (left, top, right, bottom) == region:
            # (1, 3, h, w) laid out channels-last, the layout torch's fast uint8 kernel reads: the
            # box's strided view as it is goes ~1.3x slower than this copy of it plus the resize.
            view = torch.from_numpy(pixels)[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)
            view = view.contiguous(memory_format=torch.channels_last)
            out[i].copy_(F.interpolate(view, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        else:
            around = Image.fromarray(pixels[top:bottom, left:right])
            box = (region[0] - left, region[1] - top, region[2] - left, region[3] - top)
            # np.array: a writable copy, which torch.from_numpy needs (Pillow's buffer is read-only).
            resized = np.array(around.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
            out[i].copy_(torch.from_numpy(resized).permute(2, 0, 1))
    return out


def _pillow_box(image: Image.Image, regions: Sequence[Region], size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``pillow-box``: Pillow's resize of each region of the whole picture (its filter reads past
    the region's edges), as runs recorded before ``crop_resize`` existed were trained."""
    out = _output(out, len(regions), size)
    for i, region in enumerate(regions):
        resized = np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=region), dtype=np.uint8)
        out[i].copy_(torch.from_numpy(resized).permute(2, 0, 1))
    return out


def _decode_simplejpeg(
    data: bytes, boxes_of: Callable[[int, int], Sequence[CropBox]], size: int, draft: bool, out: torch.Tensor | None
) -> torch.Tensor | None:
    """The views, or None when libjpeg-turbo cannot give RGB at Pillow's scale (CMYK, a damaged
    file): Pillow then decides, as it did before."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in _SAME_AS_PILLOW:
        return None
    boxes = list(boxes_of(height, width))
    s = _draft_denominator(width, height, _needed_size(width, height, boxes, size)) if draft else 1
    decoded_h, decoded_w = -(-height // s), -(-width // s)
    try:
        pixels = simplejpeg.decode_jpeg(data, "rgb", min_height=decoded_h, min_width=decoded_w, min_factor=s)
    except ValueError:
        return None
    if pixels.shape[:2] != (decoded_h, decoded_w):
        return None
    return _cut_and_resize(pixels, _regions(boxes, width, height, decoded_w, decoded_h), size, out)


def decode_boxes(
    path: str | os.PathLike,
    boxes_of: Callable[[int, int], Sequence[CropBox]],
    size: int,
    draft: bool = True,
    decoder: str = "auto",
    resize: str = RESIZE_MODES[0],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode the file once and cut the boxes ``boxes_of(height, width)`` (in full-resolution
    pixels), each resized to ``size`` x ``size`` (aspect not kept): uint8 (len(boxes), 3, size, size).
    The boxes are chosen from the file's header before decoding, so a JPEG decodes only at the
    DCT scale its boxes need (``draft=False``: always at full size). ``decoder``: ``auto``,
    ``simplejpeg`` or ``pillow`` (the fallback; non-JPEG files always use it); ``resize``: one of
    ``crops.RESIZE_MODES`` (``pillow-box`` always decodes with Pillow). ``out``: the tensor to write
    the views into (e.g. rows of a batch buffer; returned), instead of a new one. Raises on bad files."""
    if resize not in RESIZE_MODES:
        raise PretextlabError(f"unknown crop resize {resize!r}: choose one of {', '.join(RESIZE_MODES)}")
    data = None
    if resolve_decoder(decoder) == "simplejpeg" and resize == "crop-then-resize":
        with open(path, "rb") as file:
            data = file.read()
        if data.startswith(_JPEG_MAGIC):
            views = _decode_simplejpeg(data, boxes_of, size, draft, out)
            if views is not None:
                return views
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        width, height = image.size
        boxes = list(boxes_of(height, width))
        if draft:
            # draft keeps the decoded image >= the requested size, so each box, scaled alike, stays >= size.
            image.draft("RGB", _needed_size(width, height, boxes, size))
        image = to_rgb(image)
        regions = _regions(boxes, width, height, *image.size)
        if resize == "pillow-box":
            return _pillow_box(image, regions, size, out)
        return _cut_and_resize(np.array(image), regions, size, out)


def decode_box(
    path: str | os.PathLike, box_of: Callable[[int, int], CropBox], size: int, draft: bool = True,
    decoder: str = "auto", resize: str = RESIZE_MODES[0],
) -> torch.Tensor:
    """``decode_boxes`` for one box: uint8 (3, size, size)."""
    return decode_boxes(path, lambda h, w: [box_of(h, w)], size, draft, decoder, resize)[0]
