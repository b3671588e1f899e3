"""Issue 16 item 1, the loader's speed: crops decoded by libjpeg-turbo through simplejpeg (Pillow as
the fallback) and resized crop-then-resize, with the box semantics of the Pillow path; runs
recorded before keep Pillow's resize (``crop_resize`` pillow-box)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretextlab.config import TrainConfig, config_differences, resolve
from pretextlab.data.crops import CropBox, CropRequest, DecodePlan, crop_rng, sample_crop_box, with_resize
from pretextlab.data.decode import decode_boxes, resolve_decoder
from pretextlab.data.folder import decode_planned
from pretextlab.errors import PretextlabError


def _photo(path: Path, size=(1600, 1200), centre=(1000, 700), mode="RGB", fmt="JPEG") -> Path:
    """A gradient with texture (so a shifted box changes many pixels) and a dark disc of radius 40 at ``centre``."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    image = np.stack([xx * 255 // size[0], yy * 255 // size[1], 128 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], axis=-1)
    image[(xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < 40**2] = 0
    Image.fromarray(image.astype(np.uint8)).convert(mode).save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def _dark_centroid(view: torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(view.float().sum(0).numpy() < 90)
    return np.array([xs.mean(), ys.mean()])


def _pillow_box_reference(path: Path, boxes: list[CropBox], size: int) -> torch.Tensor:
    """The loader's code before this change, written out: Pillow draft at the boxes' scale, then
    Pillow's resize(box=...) of the whole decoded picture."""
    with Image.open(path) as image:
        width, height = image.size
        image.draft("RGB", (max(math.ceil(width * size / b.width) for b in boxes), max(math.ceil(height * size / b.height) for b in boxes)))
        sx, sy = image.size[0] / width, image.size[1] / height
        image = image.convert("RGB")
        views = [np.asarray(image.resize((size, size), Image.Resampling.BILINEAR,
                                         box=(b.left * sx, b.top * sy, (b.left + b.width) * sx, (b.top + b.height) * sy))) for b in boxes]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2)


# Boxes around the disc at (1000, 700) of a 1600x1200 file: full scale with a small box (whole
# pixels: torch's kernel), 1/2 and 1/4 scale with edges between decoded pixels (Pillow's kernel on
# the pixels around the box), and the whole file at 1/8.
BOXES = [CropBox(550, 850, 300, 300), CropBox(301, 601, 899, 997), CropBox(0, 0, 1200, 1600), CropBox(450, 750, 501, 503)]
SIZES = [112, 224, 64, 112]


def test_simplejpeg_and_the_pillow_fallback_cut_the_same_boxes_as_the_pillow_path(tmp_path):
    path = _photo(tmp_path / "photo.jpg")
    assert resolve_decoder("auto") == "simplejpeg"  # a declared dependency (pyproject.toml)
    for box, size in zip(BOXES, SIZES):
        fast = decode_boxes(path, lambda h, w: [box], size, decoder="simplejpeg")[0]
        fallback = decode_boxes(path, lambda h, w: [box], size, decoder="pillow")[0]
        before = _pillow_box_reference(path, [box], size)[0]
        assert fast.shape == fallback.shape == before.shape == (3, size, size) and fast.dtype == torch.uint8
        # The two decoders are one libjpeg-turbo at one DCT scale: the same picture (1 level of
        # slack for a different libjpeg-turbo build).
        assert (fast.int() - fallback.int()).abs().max() <= 1
        # Same box as before: the disc's centroid agrees to a tenth of an output pixel, and inside
        # the outermost row and column (where Pillow's filter also read pixels past the box) the
        # pictures agree up to rounding.
        assert np.abs(_dark_centroid(fast) - _dark_centroid(before)).max() < 0.1
        inner = (fast.int() - before.int())[:, 1:-1, 1:-1].abs()
        assert inner.max() <= 1 and inner.float().mean() < 0.05
        assert (fast.int() - before.int()).abs().float().mean() < 0.5
    # A box moved by one pixel of the file is seen: the test can tell boxes apart.
    moved = decode_boxes(path, lambda h, w: [CropBox(551, 850, 300, 300)], 112)[0]
    assert (moved.int() - decode_boxes(path, lambda h, w: [BOXES[0]], 112)[0].int()).abs().float().mean() > 1.0


def test_files_simplejpeg_does_not_take_fall_back_to_pillow_and_bad_names_are_refused(tmp_path):
    files = [
        _photo(tmp_path / "gray.jpg", size=(300, 200), centre=(150, 100), mode="L"),
        _photo(tmp_path / "cmyk.jpg", size=(300, 200), centre=(150, 100), mode="CMYK"),
        _photo(tmp_path / "photo.png", size=(300, 200), centre=(150, 100), fmt="PNG"),
    ]
    box = CropBox(40, 70, 120, 160)
    for path in files:
        auto = decode_boxes(path, lambda h, w: [box], 48)
        assert torch.equal(auto, decode_boxes(path, lambda h, w: [box], 48, decoder="pillow")), path.name
        assert np.abs(_dark_centroid(auto[0]) - 23.5).max() < 1.0, path.name  # the disc sits in the box's centre
    with pytest.raises(PretextlabError, match="unknown JPEG decoder 'turbo'"):
        decode_boxes(files[0], lambda h, w: [box], 48, decoder="turbo")
    with pytest.raises(PretextlabError, match="unknown crop resize"):
        DecodePlan("inception", 48, resize="nearest")


def test_a_run_recorded_before_crop_resize_keeps_pillows_resize_and_its_hash(tmp_path):
    path = _photo(tmp_path / "photo.jpg", size=(500, 375), centre=(250, 180))
    new = resolve(TrainConfig(dataset="folder", data_dir="/nonexistent"))
    assert new.crop_resize == "crop-then-resize"
    # Read only by crops cut while decoding: other runs get the legacy value, which the hash leaves out.
    fashion = resolve(TrainConfig())
    assert fashion.crop_resize == "pillow-box"
    assert fashion.config_hash() == TrainConfig.from_saved({k: v for k, v in fashion.to_dict().items() if k != "crop_resize"}).config_hash()
    old = {k: v for k, v in new.to_dict().items() if k != "crop_resize"}
    loaded = TrainConfig.from_saved(json.loads(json.dumps(old)))
    assert loaded.crop_resize == "pillow-box"
    assert loaded.config_hash() == resolve(TrainConfig(dataset="folder", data_dir="/nonexistent", crop_resize="pillow-box")).config_hash()
    assert loaded.config_hash() != new.config_hash()
    assert config_differences(old, new.to_dict()) == ["crop_resize: 'pillow-box' -> 'crop-then-resize'"]
    # The trainer hands the task's plan the run's resize; the old one is the old code's pixels.
    plan = DecodePlan("inception", 64, copies=3)
    assert with_resize(None, "pillow-box") is None and with_resize(plan, None) is plan
    request = CropRequest(index=0, epoch=1, batch=2, rank=0, position=3)
    legacy = decode_planned(path, with_resize(plan, loaded.crop_resize), 7, request)
    current = decode_planned(path, with_resize(plan, new.crop_resize), 7, request)
    # The boxes are a pure function of the request, whatever the resize.
    boxes = [sample_crop_box(crop_rng(7, 1, 2, 0, 3, copy), 375, 500, plan.crop) for copy in range(3)]
    assert torch.equal(legacy, _pillow_box_reference(path, boxes, 64))
    assert not torch.equal(legacy, current) and (legacy.int() - current.int()).abs().float().mean() < 0.5


def test_the_trainer_hands_the_loader_the_runs_crop_resize(tmp_path):
    """A run's ``crop_resize`` reaches the crops it trains on: a pillow-box run's first batch is the
    old code's, a crop-then-resize run's is not."""
    from pretextlab.data import BatchLoader
    from pretextlab.training import Trainer

    root = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                _photo(root / split / label / f"{i}.jpg", size=(120, 90), centre=(40 + 20 * i, 45))
    batches = {}
    for resize in ("pillow-box", "crop-then-resize"):
        config = TrainConfig(task="rotation", network="resnet50v1", width=1, dataset="folder", data_dir=str(root), image_size=16,
                             val_size=2, batch_size=2, epochs=1, workers=0, device="cpu", crop_resize=resize)
        trainer = Trainer(config, tmp_path / resize, progress=False)
        assert trainer.config.crop_resize == resize
        batches[resize] = next(trainer._epoch_batches()).images
        plan = with_resize(trainer.task.decode_plan(True), resize)
        (expected, *_) = BatchLoader(trainer.splits.train, 2, shuffle=True, seed=trainer.config.seed, epoch=0, drop_last=True, plan=plan)
        assert torch.equal(batches[resize], expected.images)
    assert not torch.equal(batches["pillow-box"], batches["crop-then-resize"])


def test_a_batch_decodes_straight_into_one_tensor_with_each_files_own_pixels(tmp_path):
    """``PlannedFolderImages.__getitems__`` (the loader's batch path) writes every file's views into
    one batch tensor, no per-file tensors: the pixels are those of ``__getitem__`` file by file, an
    unreadable file's rows go to the next file, and a worker process builds the batch in shared
    memory, so handing it over copies nothing."""
    from pretextlab.data import BatchLoader
    from pretextlab.data.folder import FolderImageSet, PlannedFolderImages, scan_split

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i, (size, fmt) in enumerate([((120, 90), "JPEG"), ((64, 80), "PNG"), ((90, 90), "JPEG")]):
        _photo(folder / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", size=size, centre=(30, 40), fmt=fmt)
    (folder / "1b.jpg").write_bytes(b"\xff\xd8 not a picture")  # sorts between 1.png and 2.jpg
    images = FolderImageSet.from_scan(scan_split(tmp_path, "train", progress=False), 16)
    for plan in (DecodePlan("inception", 12, copies=3), DecodePlan("squash", 10), DecodePlan("inception", 12, resize="pillow-box")):
        dataset = PlannedFolderImages(images, plan, seed=4)
        requests = [CropRequest(index, 1, 2, 0, position) for position, index in enumerate([3, 0, 2, 1])]
        batch, labels, skipped = dataset.__getitems__(requests)
        views = plan.copies
        one_by_one = [dataset[r] for r in requests]
        assert one_by_one[2] is None and skipped == 1 and labels.tolist() == [0, 0, 0]
        expected = torch.cat([item[0].reshape(views, 3, plan.size, plan.size) for item in one_by_one if item is not None])
        assert batch.shape == (3 * views, 3, plan.size, plan.size) and batch.dtype == torch.uint8
        assert torch.equal(batch, expected)
        # The loader hands on that tensor; from a worker process it arrives in shared memory.
        (in_process,) = BatchLoader(images, 4, shuffle=False, plan=plan)
        (from_worker,) = BatchLoader(images, 4, shuffle=False, plan=plan, workers=1)
        assert torch.equal(in_process.images, from_worker.images) and from_worker.images.is_shared()
        assert (in_process.skipped, in_process.copies, len(in_process)) == (1, views, 3)
    with pytest.raises(PretextlabError, match="decode output must be uint8"):
        decode_boxes(folder / "0.jpg", lambda h, w: [CropBox(0, 0, 90, 120)], 12, out=torch.empty((1, 3, 12, 13), dtype=torch.uint8))


def test_crop_streams_are_the_seed_sequence_of_the_crops_place_whatever_the_size_of_its_numbers():
    """``crop_rng`` hands SeedSequence an array of 32-bit words when every number fits in one (the
    fast way); the stream stays the one of the plain list (the boxes of runs already trained)."""
    for place in [(0, 0, 0, 0, 0, 0), (7, 1, 2, 0, 3, 5), (2**32 - 1, 9, 2**31, 1, 63, 7), (2**32, 0, 1, 0, 0, 0), (2**40 + 3, 5, 0, 2, 1, 0)]:
        plain = np.random.default_rng(np.random.SeedSequence([0x6372_6F70, *place]))
        assert np.array_equal(crop_rng(*place).integers(0, 2**62, 16), plain.integers(0, 2**62, 16)), place
