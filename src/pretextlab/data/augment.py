"""Batched augmentations that run on the training device.

The data loader only decodes; everything random happens here, on whole batches of tensors, on the
GPU when there is one. Every function draws its randomness from an explicit ``torch.Generator``
(on the tensors' device), so a run can be replayed and resumed exactly.

Images are float tensors in [0, 1] of shape (B, C, H, W) unless a function says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretextlab.errors import PretextlabError

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # as tf.image.rgb_to_grayscale and torchvision


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the input range of the study's Rotation models."""
    return x * 2.0 - 1.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a batch (antialiased when shrinking, as PIL would)."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
    attempts: int = 10,
) -> torch.Tensor:
    """Inception-style crop boxes (x0, y0, x1, y1) in pixels, one per image, vectorised.

    Same rule as torchvision's RandomResizedCrop: draw area fraction and log-aspect-ratio, keep the
    first of ``attempts`` draws that fits, fall back to the central crop clipped to ``ratio``.
    """
    area = float(height * width)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = _uniform(batch * attempts, scale[0], scale[1], generator, device).view(batch, attempts) * area
    aspect = torch.exp(_uniform(batch * attempts, *log_ratio, generator, device)).view(batch, attempts)
    crop_w = torch.sqrt(target_area * aspect).round()
    crop_h = torch.sqrt(target_area / aspect).round()
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = torch.argmax(fits.int(), dim=1)
    any_fit = fits.any(dim=1)
    rows = torch.arange(batch, device=device)
    w = crop_w[rows, first]
    h = crop_h[rows, first]
    # Fallback: the whole image, clipped to the allowed aspect ratios, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = float(width), round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fb_w, fb_h = round(height * ratio[1]), float(height)
    else:
        fb_w, fb_h = float(width), float(height)
    w = torch.where(any_fit, w, torch.full_like(w, fb_w))
    h = torch.where(any_fit, h, torch.full_like(h, fb_h))
    x0 = torch.floor(_uniform(batch, 0.0, 1.0, generator, device) * (width - w + 1)).clamp(min=0)
    y0 = torch.floor(_uniform(batch, 0.0, 1.0, generator, device) * (height - h + 1)).clamp(min=0)
    x0 = torch.where(any_fit, x0, torch.full_like(x0, (width - fb_w) // 2))
    y0 = torch.where(any_fit, y0, torch.full_like(y0, (height - fb_h) // 2))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def crop_and_resize(x: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Cut one box per image (x0, y0, x1, y1 in pixels) and resize it to ``size``, in one batched op."""
    size = (size, size) if isinstance(size, int) else size
    rois = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], dim=1)
    # aligned=True puts pixel centres at +0.5 (as F.interpolate with align_corners=False); the
    # adaptive sampling ratio averages ceil(box/size) samples per output pixel, an antialias.
    # Imported here, not at the top: importing torchvision loads its model zoo (~1.5 s), which
    # every `pretextlab` command would otherwise pay at start-up for the one op used from it.
    from torchvision.ops import roi_align
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The inception crop: a random area and aspect ratio per image, resized to ``size``."""
    boxes = sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, ratio, generator, x.device)
    return crop_and_resize(x, boxes, size)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Horizontal flip of each image with probability p."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RGB -> gray, kept as 3 identical channels so the network's input shape does not change."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    weights = torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def random_grayscale(
    x: torch.Tensor, p: float, generator: torch.Generator | None = None, group: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn each image gray with probability p; returns (images, the boolean decision per image).

    With ``group`` > 1 the rows of ``x`` are the ``group`` consecutive views of each image (e.g. its
    9 patches), which share one decision: one draw per image, so the random stream is the same
    whichever views are made from it.
    """
    if group < 1 or x.shape[0] % group:
        raise PretextlabError(f"random_grayscale: {x.shape[0]} rows do not make groups of {group} views per image")
    decision = torch.rand(x.shape[0] // group, generator=generator, device=x.device) < p
    per_row = decision.repeat_interleave(group) if group > 1 else decision
    return torch.where(per_row[:, None, None, None], grayscale(x), x), decision


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6.0
    hg = (b - r) / safe + 2.0
    hb = (r - g) / safe + 4.0
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb)) / 6.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue % 1.0, sat, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], dim=1)
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * f


def color_jitter(
    x: torch.Tensor,
    strength: float,
    generator: torch.Generator | None = None,
    hue_strength: float | None = None,
) -> torch.Tensor:
    """Random brightness, contrast, saturation (each factor in [1-s, 1+s]) and hue shift, per image.

    The order is fixed (brightness, contrast, saturation, hue): a random order per image would need
    per-image branching, and the study's code applies a fixed order too.
    """
    if strength <= 0:
        return x
    batch, device = x.shape[0], x.device
    hue_strength = strength / 4.0 if hue_strength is None else hue_strength
    brightness = _uniform(batch, 1 - strength, 1 + strength, generator, device).view(-1, 1, 1, 1)
    contrast = _uniform(batch, 1 - strength, 1 + strength, generator, device).view(-1, 1, 1, 1)
    saturation = _uniform(batch, 1 - strength, 1 + strength, generator, device).view(-1, 1, 1, 1)
    hue_shift = _uniform(batch, -hue_strength, hue_strength, generator, device).view(-1, 1, 1)
    x = (x * brightness).clamp(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = grayscale(x)
    x = ((x - gray) * saturation + gray).clamp(0, 1)
    if hue_strength > 0:
        hsv = _rgb_to_hsv(x)
        hsv = torch.stack([(hsv[:, 0] + hue_shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        x = _hsv_to_rgb(hsv).clamp(0, 1)
    return x


# slim's fast-mode colour distortion (inception_preprocessing.distort_color, fast_mode=True):
# random_brightness(max_delta=32/255) and random_saturation(0.5, 1.5).
BRIGHTNESS_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)


def distort_color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """slim's fast-mode ``distort_color`` per image, as ``preprocess_for_train(fast_mode=True)`` runs it
    (``num_distort_cases = 1``: ordering 0 only): brightness + U(-32/255, 32/255), then saturation
    x U(0.5, 1.5), clipped to [0, 1] once at the end (slim clips after both ops, not between).

    Saturation is a blend with the gray image (torchvision's semantics) where TF scales S in HSV;
    the two agree on gray images and on the factor's range. Used by Rotation (``released``
    augmentation) and Exemplar (docs/protocol.md, training preprocessing).
    """
    batch, device = x.shape[0], x.device
    delta = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * BRIGHTNESS_DELTA
    low, high = SATURATION_RANGE
    factor = torch.rand(batch, generator=generator, device=device) * (high - low) + low
    x = x + delta.view(-1, 1, 1, 1)
    gray = grayscale(x)
    x = gray + (x - gray) * factor.view(-1, 1, 1, 1)
    return x.clamp(0.0, 1.0)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation with TensorFlow's ``per_image_standardization`` semantics.

    (x - mean) / max(std, 1/sqrt(N)) over all values of each image, so a flat image does not
    divide by zero.
    """
    dims = tuple(range(1, x.ndim))
    count = math.prod(x.shape[1:])
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.clamp(std, min=1.0 / math.sqrt(count))
