"""Rotation's training colours (issue 16 item 2): the released recipe is slim's fast-mode
brightness and saturation, shared with Exemplar (``augment.distort_color``); the torchvision-style
jitter stays behind ``--rotation-augmentation jitter``, the Fashion-MNIST default and the meaning of
a config.json written before the option. Real Fashion-MNIST images and PIL-drawn colour images."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pretextlab.config import TrainConfig, config_differences, resolve, task_options
from pretextlab.data import augment
from pretextlab.errors import PretextlabError
from pretextlab.tasks.rotation import RotationOptions, RotationTask

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _fashion_mnist(count: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST test images, uint8 (count, 3, 28, 28)."""
    with gzip.open(FASHION, "rb") as handle:
        data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    return torch.from_numpy(data.copy())[:, None].expand(-1, 3, -1, -1).contiguous()


def _colour_images(directory: Path, count: int, side: int = 24) -> torch.Tensor:
    """Mid-range colours (no channel near 0 or 255, so nothing clips) drawn with PIL, saved, read back."""
    rng = np.random.default_rng(0)
    loaded = []
    for index in range(count):
        image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(90, 166, 3)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((4, 4, side // 2, side - 6), fill=tuple(int(v) for v in rng.integers(90, 166, 3)))
        path = directory / f"{index}.png"
        image.save(path)
        loaded.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(loaded)


def _train_view(task: RotationTask, images: torch.Tensor, seed: int) -> torch.Tensor:
    """The unrotated training views (the first B rows of the 4B prepared inputs)."""
    inputs, targets, _ = task.prepare(images, True, torch.Generator().manual_seed(seed))
    assert torch.equal(targets[: len(images)], torch.zeros(len(images), dtype=torch.long))
    return inputs[: len(images)]


def test_released_rotation_colours_are_slims_fast_mode_after_the_flip():
    images = _fashion_mnist(8)
    # Crops cut by the loader (crop_source full-image), so the views are the colours alone.
    task = RotationTask(4, RotationOptions(image_size=28, crop_source="full-image", rotation_augmentation="released"))
    generator = torch.Generator().manual_seed(3)
    expected = augment.to_unit(images)
    expected = augment.random_flip(expected, generator)
    expected = augment.to_signed(augment.distort_color(expected, generator))
    assert torch.equal(_train_view(task, images, 3), expected)
    # A task built without a run config (None) follows the released recipe too.
    assert torch.equal(_train_view(RotationTask(4, RotationOptions(image_size=28, crop_source="full-image")), images, 3), expected)


def test_brightness_is_added_within_32_of_255_and_there_is_no_contrast_or_multiplicative_brightness():
    """Gray Fashion-MNIST images: saturation does nothing, so every unclipped pixel moves by the same
    delta, |delta| <= 32/255 (slim's random_brightness). The jitter scales (x[0.6, 1.4]) and
    stretches contrast instead, so pixels of different values move by different amounts."""
    images = _fashion_mnist(64)
    x = augment.to_unit(images).double()
    for mode, additive in (("released", True), ("jitter", False)):
        task = RotationTask(4, RotationOptions(image_size=28, crop_source="full-image", flip=False, rotation_augmentation=mode))
        shift = (augment.to_unit(((_train_view(task, images, 5).double() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)).double() - x)
        inside = (x > 40 / 255) & (x < 200 / 255)  # far from both clipping ends
        spread = [float(s[m].max() - s[m].min()) for s, m in zip(shift, inside)]
        deltas = [float(s[m].mean()) for s, m in zip(shift, inside)]
        if additive:
            assert max(spread) <= 1.0 / 255 + 1e-9  # one shift per image (up to the uint8 rounding above)
            assert max(abs(d) for d in deltas) <= 32 / 255 + 1 / 255
            assert max(deltas) > 16 / 255 and min(deltas) < -16 / 255  # the whole range is used
        else:
            assert max(spread) > 10 / 255


def test_saturation_factor_stays_in_half_to_one_and_a_half(tmp_path):
    images = _colour_images(tmp_path, 48)
    x = augment.to_unit(images).double()
    task = RotationTask(4, RotationOptions(image_size=24, crop_source="full-image", flip=False, rotation_augmentation="released"))
    out = (_train_view(task, images, 11).double() + 1) / 2
    chroma_in = x - augment.grayscale(x)
    chroma_out = out - augment.grayscale(out)
    # Per image one factor scales the colour away from gray: |chroma_out| / |chroma_in| in [0.5, 1.5].
    # (The gray weights sum to 0.9999, so brightness leaks 1e-4 x delta into the chroma: tolerance 1e-3.)
    factors = chroma_out.flatten(1).norm(dim=1) / chroma_in.flatten(1).norm(dim=1)
    assert factors.min() >= 0.5 - 1e-3 and factors.max() <= 1.5 + 1e-3
    assert factors.min() < 0.7 and factors.max() > 1.3
    # The jitter's hue shift rotates colours; slim's fast mode keeps each pixel's chroma direction.
    cosine = (chroma_out * chroma_in).sum(dim=1) / (chroma_out.norm(dim=1) * chroma_in.norm(dim=1)).clamp_min(1e-12)
    assert cosine[chroma_in.norm(dim=1) > 0.05].min() > 1 - 1e-3


def test_the_default_follows_the_dataset_and_an_old_config_json_keeps_the_jitter():
    folder = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent"))
    fashion = resolve(TrainConfig())
    assert (folder.rotation_augmentation, fashion.rotation_augmentation) == ("released", "jitter")
    assert task_options(folder).rotation_augmentation == "released"
    chosen = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", rotation_augmentation="jitter"))
    assert chosen.rotation_augmentation == "jitter" and chosen.config_hash() != folder.config_hash()
    # A config.json written before the option: no key, loaded as the jitter it was trained with,
    # same hash; resuming it under today's folder default names the change.
    old = {k: v for k, v in chosen.to_dict().items() if k != "rotation_augmentation"}
    loaded = resolve(TrainConfig.from_saved(old))
    assert loaded.rotation_augmentation == "jitter" and loaded.config_hash() == chosen.config_hash()
    assert "rotation_augmentation: 'jitter' -> 'released'" in config_differences(old, folder.to_dict())
    # The Fashion-MNIST default is the jitter, so its runs keep their hashes.
    assert fashion.config_hash() == resolve(TrainConfig.from_saved(
        {k: v for k, v in fashion.to_dict().items() if k != "rotation_augmentation"})).config_hash()
    with pytest.raises(PretextlabError, match="--rotation-augmentation 'slim': choose one of released, jitter"):
        resolve(TrainConfig(rotation_augmentation="slim"))
