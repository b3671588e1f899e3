"""Issue 16 items 1 and 4: the released training crops (cut from the whole file while decoding)
and TF's BatchNorm / initialisation defaults, the defaults for folder datasets."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretextlab.config import LEGACY_VALUES, TrainConfig, config_differences, resolve
from pretextlab.data import BatchLoader, DecodePlan
from pretextlab.data.crops import CropBox, CropRequest, InceptionCrop, crop_rng, sample_crop_box
from pretextlab.data.folder import FolderImageSet, decode_box, decode_image, decode_planned, scan_split
from pretextlab.errors import PretextlabError
from pretextlab.models import build_network
from pretextlab.tasks import build_task, task_options

H, W = 375, 500  # an ImageNet-sized landscape image


def _boxes(n: int, height: int = H, width: int = W, spec: InceptionCrop = InceptionCrop()) -> np.ndarray:
    return np.array([sample_crop_box(crop_rng(0, 0, i // 64, 0, i % 64), height, width, spec) for i in range(n)])


def test_ten_thousand_crop_boxes_keep_slims_constraints_and_reach_every_corner():
    boxes = _boxes(10_000)
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= H).all() and (left + width <= W).all()
    area = height * width / (H * W)
    # min_object_covered 0.1 of the whole image lifts slim's 5% area floor to 10%.
    assert area.min() >= 0.1 and area.max() <= 1.0
    # The width is the height times an aspect in [0.75, 1.33], rounded to a whole pixel.
    assert (width >= 0.75 * height - 0.5).all() and (width <= 1.33 * height + 0.5).all()
    # The boxes spread over the whole image: many boxes reach each corner's 5% x 5% square (the
    # centre square of a landscape image never comes within 62 px of its left and right sides),
    # and small and large boxes both occur.
    dy, dx = round(0.05 * H), round(0.05 * W)
    for y, x in ((dy, dx), (dy, W - 1 - dx), (H - 1 - dy, dx), (H - 1 - dy, W - 1 - dx)):
        inside = (top <= y) & (y < top + height) & (left <= x) & (x < left + width)
        assert inside.sum() >= 20, (y, x)
    assert (left == 0).sum() >= 20 and (left + width == W).sum() >= 20 and (top == 0).sum() >= 20 and (top + height == H).sum() >= 20
    assert area.min() < 0.12 and area.max() > 0.9


def test_an_impossible_aspect_falls_back_to_the_whole_image_and_boxes_are_pure_functions_of_their_place():
    # A 1000x10 strip has no box of aspect 0.75-1.33 covering 10% of it: 100 failed attempts -> whole image.
    assert sample_crop_box(crop_rng(0, 0, 0, 0, 0), 10, 1000) == CropBox(0, 0, 10, 1000)
    first = sample_crop_box(crop_rng(3, 2, 7, 1, 5), H, W)
    assert sample_crop_box(crop_rng(3, 2, 7, 1, 5), H, W) == first
    others = {sample_crop_box(crop_rng(3, 2, 7, 1, p), H, W) for p in range(20)}
    assert len(others) > 15


def _marker_jpeg(path: Path, size=(1600, 1200), centre=(1000, 700), quality=95) -> None:
    """A smooth gradient with a dark disc of radius 40 at ``centre`` (x, y)."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    image = np.stack([xx * 255 // size[0], yy * 255 // size[1], np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    image[(xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < 40**2] = 0
    Image.fromarray(image).save(path, quality=quality)


def _dark_centroid(view: torch.Tensor) -> np.ndarray:
    dark = view.float().sum(0).numpy() < 90
    ys, xs = np.nonzero(dark)
    return np.array([xs.mean(), ys.mean()])


def test_draft_decoding_at_the_crops_scale_cuts_the_same_box_as_full_decoding(tmp_path):
    path = tmp_path / "marker.jpg"
    _marker_jpeg(path)
    with Image.open(path) as image:
        image.draft("RGB", (200, 150))
        assert image.size == (200, 150)  # the file really decodes at 1/8 when the box allows it
    for box, size in ((CropBox(300, 600, 900, 1000), 112), (CropBox(0, 0, 1200, 1600), 64), (CropBox(550, 850, 300, 300), 48)):
        fast = decode_box(path, lambda h, w: box, size)
        slow = decode_box(path, lambda h, w: box, size, draft=False)
        assert fast.shape == slow.shape == (3, size, size) and fast.dtype == torch.uint8
        # Same place: the marker's centroid moves by well under a pixel of the output (~1 px of
        # the full image at these scales), and the pictures agree up to JPEG's DCT-scaling error.
        assert np.abs(_dark_centroid(fast) - _dark_centroid(slow)).max() < 0.5
        assert (fast.float() - slow.float()).abs().mean() < 3.0


def _class_folder(root: Path, images: dict[str, np.ndarray]) -> Path:
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for name, array in images.items():
                Image.fromarray(array).save(folder / name, quality=95)
    return root


def _side_stripes(seed: int) -> np.ndarray:
    """A 200x100 landscape picture: red in the 20 leftmost columns, blue elsewhere, plus noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :, 2] = 200
    image[:, :20] = (220, 0, 0)
    return np.clip(image.astype(int) + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def stripes(tmp_path) -> FolderImageSet:
    root = _class_folder(tmp_path / "data", {f"{i}.jpg": _side_stripes(i) for i in range(6)})
    scan = scan_split(root, "train", progress=False)
    return FolderImageSet.from_scan(scan, 32)


def _reds(images: torch.Tensor) -> int:
    red = (images[:, 0].int() > 150) & (images[:, 2].int() < 80)
    return int(red.flatten(1).any(1).sum())


def test_training_crops_see_the_sides_of_the_image_that_the_centre_square_cuts_away(stripes):
    centre = [b.images for b in BatchLoader(stripes, 4, shuffle=True, seed=0, epoch=0, drop_last=True)]
    assert _reds(torch.cat(centre)) == 0  # the centre 100x100 square never shows the red side
    plan = DecodePlan("inception", 32, copies=4)
    crops = []
    for epoch in range(3):
        for batch in BatchLoader(stripes, 4, shuffle=True, seed=0, epoch=epoch, drop_last=True, plan=plan):
            assert batch.images.shape == (4 * 4, 3, 32, 32) and batch.images.dtype == torch.uint8
            assert len(batch.labels) == 4 and batch.copies == 4
            crops.append(batch.images)
    assert _reds(torch.cat(crops)) > 5


def test_patch_tasks_squash_the_whole_image_to_the_resize_side(stripes):
    (batch,) = BatchLoader(stripes, 12, shuffle=False, plan=DecodePlan("squash", 60))
    assert batch.images.shape == (12, 3, 60, 60)
    # Aspect not kept: the red 10% of the width stays the left 10% (6 of 60 columns).
    red = (batch.images[:, 0].int() > 150) & (batch.images[:, 2].int() < 80)
    assert red[:, :, :5].all() and not red[:, :, 7:].any()


def test_crops_resume_exactly_and_do_not_depend_on_the_number_of_workers(tmp_path):
    rng = np.random.default_rng(0)
    root = _class_folder(tmp_path / "data", {f"{i}.jpg": rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for i in range(8)})
    images = FolderImageSet.from_scan(scan_split(root, "train", progress=False), 32)
    plan = DecodePlan("inception", 24)
    options = dict(shuffle=True, seed=5, epoch=2, drop_last=True, plan=plan, rank=1, world_size=2)
    whole = [b.images for b in BatchLoader(images, 2, **options)]
    assert whole[0].shape == (2, 3, 24, 24)
    resumed = [b.images for b in BatchLoader(images, 2, start_batch=2, workers=2, **options)]
    assert len(whole) == 4 and len(resumed) == 2
    for a, b in zip(whole[2:], resumed):
        assert torch.equal(a, b)
    other_epoch = [b.images for b in BatchLoader(images, 2, **{**options, "epoch": 3})]
    assert not all(torch.equal(a, b) for a, b in zip(whole, other_epoch))


def test_an_in_memory_dataset_cannot_take_crops_cut_while_decoding():
    from pretextlab.data import TensorImageSet

    images = TensorImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), np.zeros(4), ["x"])
    with pytest.raises(PretextlabError, match="crop-source"):
        BatchLoader(images, 2, shuffle=False, plan=DecodePlan("inception", 8))
    with pytest.raises(PretextlabError, match="crop-source center-square"):
        resolve(TrainConfig(dataset="fashion-mnist", crop_source="full-image"))


def test_tasks_take_the_loaders_crops_and_say_what_to_decode():
    config = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", image_size=32, copies=3, flip=False,
                                 color_jitter=0.0, task="rotation", embedding_dim=8, head_hidden=16,
                                 num_permutations=10, permutations_per_batch=2))
    rotation = build_task("rotation", 16, task_options("rotation", config))
    assert rotation.decode_plan(True) == DecodePlan("inception", 32) and rotation.decode_plan(False) is None
    # Gray images in 60..180: whichever colour augmentation runs (brightness, contrast, saturation,
    # hue) maps each pixel by one increasing function, unclipped; a crop would move pixels.
    images = torch.randint(60, 181, (2, 1, 32, 32), dtype=torch.uint8).expand(-1, 3, -1, -1).contiguous()
    prepared = rotation.prepare(images, True, torch.Generator().manual_seed(0))
    assert prepared.inputs.shape == (8, 3, 32, 32)
    for image, view in zip(images, prepared.inputs[:2]):
        order = torch.argsort(image[0].flatten().double(), stable=True)
        assert (view[0].flatten()[order].diff() >= -1e-6).all()  # no second crop: pixels stay in place
    with pytest.raises(PretextlabError, match="32x32"):
        rotation.prepare(torch.zeros(2, 3, 37, 37, dtype=torch.uint8), True)
    exemplar = build_task("exemplar", 16, task_options("exemplar", dataclasses.replace(config, task="exemplar")))
    assert exemplar.decode_plan(True) == DecodePlan("inception", 32, copies=3)
    prepared = exemplar.prepare(torch.randint(0, 256, (2 * 3, 3, 32, 32), dtype=torch.uint8), True, torch.Generator())
    assert prepared.inputs.shape == (6, 3, 32, 32) and prepared.targets.tolist() == [0, 0, 0, 1, 1, 1]
    jigsaw = build_task("jigsaw", 16, task_options("jigsaw", dataclasses.replace(config, task="jigsaw")))
    assert jigsaw.decode_plan(True) == jigsaw.decode_plan(False) == DecodePlan("squash", 292)
    legacy = build_task("rotation", 16, task_options("rotation", resolve(TrainConfig(dataset="fashion-mnist"))))
    assert legacy.decode_plan(True) is None


# -- the options in config.json -----------------------------------------------------------------


def test_folder_runs_default_to_the_released_recipe_and_fashion_mnist_keeps_its_own():
    folder = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent"))
    assert (folder.crop_source, folder.bn_init) == ("full-image", "released")
    fashion = resolve(TrainConfig())
    assert (fashion.crop_source, fashion.bn_init) == ("center-square", "pytorch")
    chosen = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", crop_source="center-square", bn_init="pytorch"))
    assert chosen.to_dict()["crop_source"] == "center-square" and chosen.config_hash() != folder.config_hash()


def test_a_config_json_written_before_the_options_loads_resumes_and_hashes_as_it_was_trained():
    new = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", crop_source="center-square", bn_init="pytorch",
                              rotation_augmentation="jitter", weight_decay_scope="conv-kernels"))
    old = {k: v for k, v in new.to_dict().items() if k not in LEGACY_VALUES}
    loaded = TrainConfig.from_saved(json.loads(json.dumps(old)))
    assert (loaded.crop_source, loaded.bn_init) == ("center-square", "pytorch")
    # The hash of an old run did not hold these keys: it is unchanged at their legacy values.
    assert loaded.config_hash() == new.config_hash()
    assert config_differences(old, new.to_dict()) == []
    released = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent"))
    assert config_differences(old, released.to_dict()) == [
        "bn_init: 'pytorch' -> 'released'", "crop_resize: 'pillow-box' -> 'crop-then-resize'", "crop_source: 'center-square' -> 'full-image'",
        "rotation_augmentation: 'jitter' -> 'released'", "weight_decay_scope: 'conv-kernels' -> 'released'",
    ]


# -- item 4: BatchNorm and initialisation -----------------------------------------------------------


def _glorot_bound(conv: torch.nn.Conv2d) -> float:
    fan_in = conv.in_channels * math.prod(conv.kernel_size) // conv.groups
    fan_out = conv.out_channels * math.prod(conv.kernel_size) // conv.groups
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("name", ["resnet50v1", "revnet50", "vgg19bn"])
def test_bn_momentum_eps_and_conv_init_per_option(name):
    torch.manual_seed(0)
    released = build_network(name, width=1, input_size=32, bn_init="released")
    pytorch = build_network(name, width=1, input_size=32, bn_init="pytorch")
    norms = [m for m in released.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all((m.momentum, m.eps) == (0.01, 1e-3) for m in norms)
    assert all((m.momentum, m.eps) == (0.1, 1e-5) for m in pytorch.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    convs = [m for m in released.modules() if isinstance(m, torch.nn.Conv2d)]
    big = [m for m in convs if m.weight.numel() >= 2000]
    assert big
    for conv in convs:
        bound = _glorot_bound(conv)
        weight = conv.weight.detach().double()
        assert weight.abs().max() <= bound
    for conv in big:
        # Uniform on [-b, b]: variance b^2/3 (within 15% for >= 2000 draws: ~4 standard errors).
        bound = _glorot_bound(conv)
        assert abs(conv.weight.detach().double().var().item() / (bound**2 / 3) - 1) < 0.15
    # PyTorch's kaiming-normal draws (fan_out, ReLU) exceed the glorot bound somewhere in every big layer.
    beyond = [m.weight.abs().max() > _glorot_bound(m) for m in pytorch.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 2000]
    assert all(beyond)


def test_the_run_config_builds_the_released_bn_in_the_network_and_the_patch_head():
    from pretextlab.training.model import build_model

    config = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", task="jigsaw", network="resnet50v1", width=1,
                                 patch_size=16, head_hidden=32, embedding_dim=8, num_permutations=10, permutations_per_batch=2))
    network, task = build_model(config)
    assert {(m.momentum, m.eps) for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(0.01, 1e-3)}
    assert (task.head.bn.momentum, task.head.bn.eps) == (pytest.approx(0.003), 1e-5)
    legacy, legacy_task = build_model(TrainConfig.from_saved({**config.to_dict(), "bn_init": None}))
    assert {(m.momentum, m.eps) for m in legacy.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(0.1, 1e-5)}
    assert legacy_task.head.bn.momentum == 0.1
    with pytest.raises(PretextlabError, match="--bn-init"):
        build_network("resnet50v1", width=1, bn_init="tf")


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_a_folder_run_interrupted_mid_epoch_resumes_with_the_same_crops_and_weights(tmp_path):
    """Trainer-level: the crops cut while decoding depend on (seed, epoch, batch, rank, position)
    only, so a run stopped after a mid-epoch checkpoint and resumed ends with the weights of the
    uninterrupted run, bit for bit (float64, one thread)."""
    from pretextlab.training import Trainer

    rng = np.random.default_rng(1)
    root = _class_folder(tmp_path / "data", {f"{i}.jpg": rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for i in range(6)})
    config = TrainConfig(
        task="rotation", network="resnet50v1", width=1, dataset="folder", data_dir=str(root), image_size=16,
        val_size=2, batch_size=2, epochs=2, workers=0, device="cpu", precision="fp64", val_batches=1, checkpoint_every=2,
    )

    class Crashing(Trainer):
        def train_step(self, images):
            if self.step == 7:  # after the checkpoint at step 6, in the second epoch
                raise _Crash
            return super().train_step(images)

    whole = Trainer(config, tmp_path / "whole", progress=False)
    whole.fit()
    with pytest.raises(_Crash):
        Crashing(config, tmp_path / "cut", progress=False).fit()
    resumed = Trainer(config, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 6
    resumed.fit()
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for part in ("network", "task"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name}"
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (saved["data"]["crop_source"], saved["network"]["bn_init"]) == ("full-image", "released")
