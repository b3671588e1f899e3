"""Batched on-device augmentations: exact geometry, determinism, and agreement with torchvision."""

import torch
from torchvision.transforms.v2 import functional as TF

from pretextlab.data import augment


def _images(batch: int = 6, h: int = 40, w: int = 50) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_crop_and_resize_cuts_exact_boxes():
    x = _images()
    whole = torch.tensor([[0.0, 0.0, 50.0, 40.0]] * 6)
    assert torch.allclose(augment.crop_and_resize(x, whole, (40, 50)), x, atol=1e-6)
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]] * 6)
    assert torch.allclose(augment.crop_and_resize(x, box, 20), x[..., 5:25, 10:30], atol=1e-6)
    # Halving the size averages 2x2 blocks (antialiased), like average pooling.
    assert torch.allclose(augment.crop_and_resize(x, whole, (20, 25)), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)


def test_random_resized_crop_boxes_respect_scale_and_ratio_and_replay():
    boxes = augment.sample_crop_boxes(2000, 100, 120, (0.2, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), torch.device("cpu"))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (100 * 120)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 100).all()
    assert area.min() > 0.18 and area.max() < 0.62  # rounding to whole pixels moves the area a little
    assert ((w / h) > 0.70).all() and ((w / h) < 1.40).all()
    x = _images()
    a = augment.random_resized_crop(x, 24, generator=torch.Generator().manual_seed(5))
    b = augment.random_resized_crop(x, 24, generator=torch.Generator().manual_seed(5))
    c = augment.random_resized_crop(x, 24, generator=torch.Generator().manual_seed(6))
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_flip_and_grayscale_decide_per_image():
    x = _images(batch=64)
    flipped = augment.random_flip(x, torch.Generator().manual_seed(0))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < int(mirrored.sum()) < 54
    gray, decision = augment.random_grayscale(x, 0.66, torch.Generator().manual_seed(0))
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert torch.equal(is_gray, decision)
    assert torch.allclose(augment.grayscale(x)[:, :1], TF.rgb_to_grayscale(x), atol=1e-6)


def test_colour_jitter_hue_matches_torchvision_and_stays_in_range():
    x = _images()
    hsv = augment._rgb_to_hsv(x)
    assert torch.allclose(augment._hsv_to_rgb(hsv), x, atol=1e-5)
    shifted = torch.stack([(hsv[:, 0] + 0.1) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    assert torch.allclose(augment._hsv_to_rgb(shifted), TF.adjust_hue(x, 0.1), atol=1e-4)
    jittered = augment.color_jitter(x, 0.4, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x)
    assert torch.equal(augment.color_jitter(x, 0.0, None), x)


def test_standardize_has_tensorflow_semantics():
    x = _images()
    y = augment.standardize(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(y.std(dim=(1, 2, 3), unbiased=False), torch.ones(6), atol=1e-4)
    flat = torch.full((2, 3, 8, 8), 0.5)
    assert torch.equal(augment.standardize(flat), torch.zeros_like(flat))  # no division by zero


def test_random_grayscale_shares_one_draw_among_the_views_of_an_image():
    images = _images(batch=40, h=6, w=5).double()  # float64: gray rows are compared exactly
    views = images.repeat_interleave(9, dim=0)  # 9 views (patches) per image
    per_image, decision = augment.random_grayscale(images, 0.5, torch.Generator().manual_seed(3))
    grouped, same = augment.random_grayscale(views, 0.5, torch.Generator().manual_seed(3), group=9)
    assert decision.shape == (40,) and 5 < int(decision.sum()) < 35
    assert torch.equal(same, decision)  # one draw per image, the same stream as without views
    assert torch.equal(grouped, per_image.repeat_interleave(9, dim=0))
    gray = grouped[decision.repeat_interleave(9)]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert torch.equal(grouped[~decision.repeat_interleave(9)], views[~decision.repeat_interleave(9)])
    try:
        augment.random_grayscale(views[:10], 0.5, group=9)
    except ValueError as error:
        assert "10 rows do not make groups of 9" in str(error)
    else:
        raise AssertionError("a batch that is not whole groups must be refused")
