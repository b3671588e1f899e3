"""Data sources, the study's splits, few-label subsets and the resumable loader, on real data:
Fashion-MNIST from /usr/share/datasets/fashion-mnist and image files written with Pillow."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pretextlab.data import (
    DATASETS,
    Batch,
    BatchLoader,
    TensorImageSet,
    batches_per_epoch,
    few_label_subset,
    load_dataset,
    split_indices,
)
from pretextlab.data import fashion_mnist
from pretextlab.data.folder import decode_image
from pretextlab.data.loader import BatchOrder, shard_batches
from pretextlab.data.splits import resolve_val_count
from pretextlab.errors import PretextlabError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist",
)


# -- Fashion-MNIST ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> fashion_mnist.FashionMnistArrays:
    return fashion_mnist.read_fashion_mnist(FASHION_DIR)


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", image_size=32, seed=0, download=False)


def test_fashion_mnist_splits_have_the_study_sizes_and_are_stratified(fmnist, raw):
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (54_000, 6_000, 10_000)
    assert fmnist.num_classes == 10 and fmnist.train.class_names[0] == "T-shirt/top"
    indices = split_indices(raw.train_labels, raw.test_labels, seed=0)
    assert len(np.intersect1d(indices.train, indices.val)) == 0
    assert len(np.union1d(indices.train, indices.val)) == 60_000
    np.testing.assert_array_equal(fmnist.val.labels, raw.train_labels[indices.val])
    np.testing.assert_array_equal(np.bincount(fmnist.val.labels), [600] * 10)
    described = fmnist.describe()
    assert described["train"] == 54_000 and described["source"] == str(FASHION_DIR)
    assert described["fingerprint"] == indices.fingerprint()


def test_stratified_validation_on_an_unbalanced_pool(raw):
    # Thin some classes out so the shares are uneven, then hold out an awkward fraction.
    labels = raw.train_labels
    keep = np.flatnonzero((labels >= 5) | (np.arange(len(labels)) % (labels + 2) == 0))
    pool_labels = labels[keep]
    indices = split_indices(pool_labels, raw.test_labels, val_size=0.137, seed=3)
    counts = np.bincount(pool_labels)
    expected = len(indices.val) * counts / counts.sum()
    got = np.bincount(pool_labels[indices.val], minlength=10)
    assert len(indices.val) == round(0.137 * len(pool_labels))
    assert np.all(np.abs(got - expected) < 1.0), (got, expected)
    assert len(np.intersect1d(indices.train, indices.val)) == 0
    assert len(indices.train) + len(indices.val) == len(pool_labels)


def test_fashion_mnist_loads_are_deterministic_and_seeded(fmnist):
    again = load_dataset("fashion-mnist", image_size=32, seed=0, download=False)
    assert again.describe() == fmnist.describe()
    np.testing.assert_array_equal(again.val.labels, fmnist.val.labels)
    first, _ = again.val.take(np.arange(50))
    second, _ = fmnist.val.take(np.arange(50))
    assert torch.equal(first, second)
    other = split_indices(fmnist.train.labels, fmnist.test.labels, seed=1)
    same = split_indices(fmnist.train.labels, fmnist.test.labels, seed=0)
    assert not np.array_equal(other.val, same.val)


def test_fashion_mnist_images_are_uint8_rgb_of_the_asked_size(fmnist, raw):
    image, label = fmnist.train[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    # At the native size the decoded images are exactly the idx file's pixels, with the right labels.
    native = load_dataset("fashion-mnist", image_size=28, limit=300, test_limit=100, seed=5, download=False)
    indices = split_indices(raw.train_labels, raw.test_labels, limit=300, test_limit=100, seed=5)
    images, labels = native.train.take(np.arange(len(native.train)))
    assert torch.equal(images[:, 0], torch.from_numpy(raw.train_images[indices.train]))
    np.testing.assert_array_equal(labels.numpy(), raw.train_labels[indices.train])
    test_images, _ = native.test.take(np.arange(len(native.test)))
    assert torch.equal(test_images[:, 1], torch.from_numpy(raw.test_images[indices.test]))
    # Resized to 32 the images keep their content: mean brightness within a fraction of a grey level.
    resized, _ = fmnist.test.take(np.arange(1000))
    assert abs(resized.float().mean().item() - raw.test_images[:1000].mean()) < 1.0


def test_limit_takes_a_balanced_pool_and_holds_val_out_of_it(raw):
    limited = load_dataset("fashion-mnist", image_size=16, limit=1005, test_limit=333, seed=2, download=False)
    assert len(limited.train) + len(limited.val) == 1005
    assert len(limited.val) == 100 and len(limited.test) == 333  # 10% of the pool
    pool_counts = np.bincount(np.concatenate([limited.train.labels, limited.val.labels]), minlength=10)
    assert pool_counts.min() == 100 and pool_counts.max() == 101 and pool_counts.sum() == 1005
    np.testing.assert_array_equal(np.bincount(limited.val.labels, minlength=10), [10] * 10)
    test_counts = np.bincount(limited.test.labels, minlength=10)
    assert test_counts.min() == 33 and test_counts.max() == 34
    # Limits are nested for one seed: the 500-image pool lies inside the 1005-image pool.
    small = split_indices(raw.train_labels, raw.test_labels, limit=500, seed=2)
    large = split_indices(raw.train_labels, raw.test_labels, limit=1005, seed=2)
    assert np.isin(np.union1d(small.train, small.val), np.union1d(large.train, large.val)).all()


def test_validation_size_rules():
    assert resolve_val_count(None, 1_281_167) == 50_000  # ImageNet: the study's 50k
    assert resolve_val_count(None, 500_000) == 50_000
    assert resolve_val_count(None, 60_000) == 6_000
    assert resolve_val_count(0.25, 1000) == 250
    assert resolve_val_count(123, 1000) == 123 and resolve_val_count(123.0, 1000) == 123
    for bad in (0, -3, 1.5, "10%", 1000, 5000):
        with pytest.raises(PretextlabError, match="val"):
            resolve_val_count(bad, 1000)


def test_dataset_errors_are_clear(tmp_path, raw):
    with pytest.raises(PretextlabError, match="fashion-mnist, folder"):
        load_dataset("imagenet")
    assert DATASETS == ("fashion-mnist", "folder")
    with pytest.raises(PretextlabError, match="limit"):
        load_dataset("fashion-mnist", limit=70_000, download=False)
    with pytest.raises(PretextlabError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.locate_fashion_mnist(tmp_path / "nothing", download=False, environment={}, system_dirs=(), cache_dir=tmp_path / "cache")
    with pytest.raises(PretextlabError, match="--data-dir"):
        load_dataset("folder", data_dir=None)


def test_fashion_mnist_is_found_in_data_dir_then_env_then_system(tmp_path, raw):
    # data_dir with plain (uncompressed) files comes first.
    plain = tmp_path / "plain" / "fashion-mnist"
    plain.mkdir(parents=True)
    for stem in fashion_mnist.FILES.values():
        with gzip.open(FASHION_DIR / f"{stem}.gz", "rb") as src, open(plain / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    # $PRETEXTLAB_DATA in torchvision's layout, with the .gz files.
    env_root = tmp_path / "env"
    (env_root / "FashionMNIST" / "raw").mkdir(parents=True)
    for stem in fashion_mnist.FILES.values():
        (env_root / "FashionMNIST" / "raw" / f"{stem}.gz").symlink_to(FASHION_DIR / f"{stem}.gz")
    env = {fashion_mnist.ENV_VAR: str(env_root)}
    assert fashion_mnist.locate_fashion_mnist(tmp_path / "plain", environment=env, download=False) == plain
    assert fashion_mnist.locate_fashion_mnist(None, environment=env, download=False) == env_root / "FashionMNIST" / "raw"
    assert fashion_mnist.locate_fashion_mnist(None, environment={}, download=False) == FASHION_DIR
    from_plain = fashion_mnist.read_fashion_mnist(plain)
    np.testing.assert_array_equal(from_plain.train_images, raw.train_images)
    np.testing.assert_array_equal(from_plain.test_labels, raw.test_labels)
    # A truncated file is named as damaged, not read as garbage.
    (plain / "t10k-labels-idx1-ubyte").write_bytes((plain / "t10k-labels-idx1-ubyte").read_bytes()[:5000])
    with pytest.raises(PretextlabError, match="truncated"):
        fashion_mnist.read_fashion_mnist(plain)


# -- image folders ---------------------------------------------------------------------------------

GOOD_TRAIN = {
    "ant": ["rgb.jpg", "rgb.png", "gray.png", "wide.jpeg", "big.jpg"],
    "bee": ["palette.png", "cmyk.jpg", "deep16.png", "tall.png", "tiny.bmp"],
    "cat": ["rgba.png", "gray.jpg", "rgb.webp", "la.png", "mono.png"],
}
BAD_TRAIN = {"cat": ["truncated.jpg", "empty.jpg", "notes.jpg"]}


def _write_good(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    name = path.name
    size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if name == "rgb.jpg" or name == "big.jpg":
        (rgb.resize((300, 200)) if name == "big.jpg" else rgb).save(path, quality=90)
    elif name in ("rgb.png", "tall.png"):
        (rgb.resize((24, 70)) if name == "tall.png" else rgb).save(path)
    elif name == "wide.jpeg":
        rgb.resize((120, 30)).save(path)
    elif name in ("gray.png", "gray.jpg"):
        rgb.convert("L").save(path)
    elif name == "palette.png":
        palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        palette.info["transparency"] = 0
        palette.save(path, transparency=0)
    elif name == "cmyk.jpg":
        rgb.convert("CMYK").save(path)
    elif name == "deep16.png":
        Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)).save(path)
    elif name == "tiny.bmp":
        rgb.resize((5, 7)).save(path)
    elif name == "rgba.png":
        rgb.convert("RGBA").save(path)
    elif name == "rgb.webp":
        rgb.save(path)
    elif name == "la.png":
        rgb.convert("LA").save(path)
    elif name == "mono.png":
        rgb.convert("1").save(path)
    else:
        raise AssertionError(name)


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    seed = 0
    for split in ("train", "val"):
        for label, names in GOOD_TRAIN.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for name in names[: 5 if split == "train" else 2]:
                seed += 1
                _write_good(folder / name, seed)
    bad = root / "train" / "cat"
    whole = bad / "whole.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(whole)
    (bad / "truncated.jpg").write_bytes(whole.read_bytes()[:300])
    whole.unlink()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image\n")
    (bad / "README.txt").write_text("ignored: not an image extension\n")
    (root / "train" / ".hidden").mkdir()
    return root


def _all_batches(images, batch_size=4, **options) -> list[Batch]:
    return list(BatchLoader(images, batch_size, shuffle=False, **options))


def test_folder_dataset_decodes_every_format_and_skips_bad_files(image_root, caplog):
    splits = load_dataset("folder", data_dir=str(image_root), image_size=24, val_size=3, seed=0)
    assert splits.num_classes == 3 and splits.train.class_names == ["ant", "bee", "cat"]
    assert len(splits.train) + len(splits.val) == 18  # 15 good + 3 bad files (bad ones are only known when decoded)
    assert len(splits.val) == 3 and len(splits.test) == 6
    np.testing.assert_array_equal(np.bincount(splits.val.labels), [1, 1, 1])
    np.testing.assert_array_equal(np.bincount(splits.test.labels), [2, 2, 2])
    with caplog.at_level(logging.WARNING, logger="pretextlab.data.folder"):
        batches = [b for split in (splits.train, splits.val, splits.test) for b in _all_batches(split)]
    assert sum(b.skipped for b in batches) == 3
    assert sum(len(b) for b in batches) == 15 + 6
    for batch in batches:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 24, 24)
        assert batch.labels.dtype == torch.int64 and len(batch.labels) == len(batch.images)
    warned = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert len(warned) == 3
    for name in BAD_TRAIN["cat"]:
        assert sum(name in message for message in warned) == 1
    # Each pass also says how many it skipped in all: the bad files are all in train or val.
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ") and "this pass" in r.getMessage()]
    counts = [int(message.split()[1]) for message in totals]
    assert sum(counts) == 3 and all(c > 0 for c in counts)


def test_decoding_converts_modes_and_crops_the_centre(tmp_path):
    # Colours survive every mode conversion.
    colour = (200, 40, 90)
    checks = {
        "rgb.png": Image.new("RGB", (40, 30), colour),
        "rgba.png": Image.new("RGBA", (40, 30), colour + (128,)),
        "palette.png": Image.new("RGB", (40, 30), colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=4),
        "cmyk.jpg": Image.new("RGB", (40, 30), colour).convert("CMYK"),
        "rgb.jpg": Image.new("RGB", (40, 30), colour),
    }
    for name, image in checks.items():
        image.save(tmp_path / name)
        decoded = decode_image(tmp_path / name, 16)
        assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
        assert torch.allclose(decoded.float().mean(dim=(1, 2)), torch.tensor(colour, dtype=torch.float32), atol=4), name
    # 16-bit gray is scaled (32768 -> 128), not clipped to white.
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(tmp_path / "deep.png")
    assert decode_image(tmp_path / "deep.png", 8).float().mean().item() == pytest.approx(127.5, abs=1.0)
    # Shorter side to S, then the centre: a 90x30 image of red | green | blue thirds shows only green.
    thirds = np.zeros((30, 90, 3), np.uint8)
    thirds[:, :30, 0] = thirds[:, 30:60, 1] = thirds[:, 60:, 2] = 255
    Image.fromarray(thirds).save(tmp_path / "thirds.png")
    decoded = decode_image(tmp_path / "thirds.png", 10)
    inner = decoded[:, :, 1:-1]  # the outermost columns blend a little of red/blue, as any resize filter does
    assert inner[1].min() == 255 and inner[0].max() == 0 and inner[2].max() == 0
    assert decoded[1].float().mean() > 240
    # Same result as torchvision's Resize(S) + CenterCrop(S) on a smooth image, up to rounding.
    y, x = np.mgrid[0:50, 0:80]
    smooth = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "smooth.png")
    reference = T.Compose([T.PILToTensor(), T.Resize(20), T.CenterCrop(20)])(Image.fromarray(smooth))
    assert (decode_image(tmp_path / "smooth.png", 20).float() - reference.float()).abs().mean() < 2.0


def test_folder_errors_are_clear(image_root, tmp_path):
    with pytest.raises(PretextlabError, match="does not exist"):
        load_dataset("folder", data_dir=str(tmp_path / "missing"))
    (image_root / "train" / "dog").mkdir()
    with pytest.raises(PretextlabError, match="dog holds no images"):
        load_dataset("folder", data_dir=str(image_root))
    (image_root / "train" / "dog").rmdir()
    (image_root / "val" / "eel").mkdir()
    with pytest.raises(PretextlabError, match="eel"):
        load_dataset("folder", data_dir=str(image_root))
    shutil.rmtree(image_root / "val")
    with pytest.raises(PretextlabError, match="no val/ folder"):
        load_dataset("folder", data_dir=str(image_root))


def test_worker_processes_decode_the_same_batches(image_root):
    splits = load_dataset("folder", data_dir=str(image_root), image_size=16, val_size=3)
    serial = list(BatchLoader(splits.train, 4, shuffle=True, seed=1, epoch=2))
    parallel = list(BatchLoader(splits.train, 4, shuffle=True, seed=1, epoch=2, workers=2, pin_memory=True))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.skipped == b.skipped


# -- loader: order, resume, shards -----------------------------------------------------------------


def test_resume_from_a_batch_yields_the_tail_of_the_epoch(fmnist, image_root):
    subset = fmnist.train.subset(np.arange(0, 54_000, 37))
    full = list(BatchLoader(subset, 64, shuffle=True, seed=4, epoch=3, drop_last=True))
    assert len(full) == batches_per_epoch(len(subset), 64, True) == len(subset) // 64
    for k in (0, 1, 9, len(full)):
        tail = list(BatchLoader(subset, 64, shuffle=True, seed=4, epoch=3, start_batch=k, drop_last=True))
        assert len(tail) == len(full) - k
        for a, b in zip(full[k:], tail):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    next_epoch = next(iter(BatchLoader(subset, 64, shuffle=True, seed=4, epoch=4)))
    assert not torch.equal(next_epoch.labels, full[0].labels)
    with pytest.raises(PretextlabError, match="start_batch"):
        BatchLoader(subset, 64, shuffle=True, start_batch=len(full) + 1, drop_last=True)
    # The same for decoded files, skipped images included.
    files = load_dataset("folder", data_dir=str(image_root), image_size=8, val_size=3).train
    whole = list(BatchLoader(files, 2, shuffle=True, seed=9, epoch=1))
    rest = list(BatchLoader(files, 2, shuffle=True, seed=9, epoch=1, start_batch=3))
    assert [b.labels.tolist() for b in whole[3:]] == [b.labels.tolist() for b in rest]
    assert [b.skipped for b in whole[3:]] == [b.skipped for b in rest]


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shards_are_disjoint_and_cover_the_epoch(drop_last):
    num_images, batch, world = 103, 8, 3
    shards = [
        np.concatenate(shard_batches(num_images, batch, shuffle=True, seed=7, epoch=2, drop_last=drop_last, rank=r, world_size=world))
        for r in range(world)
    ]
    together = np.concatenate(shards)
    assert len(np.unique(together)) == len(together)  # disjoint
    if drop_last:
        assert {len(s) for s in shards} == {num_images // world // batch * batch}
        assert all(len(_loaded_shard(num_images, batch, r, world, True)) == batches_per_epoch(num_images, batch, True, world) for r in range(world))
    else:
        np.testing.assert_array_equal(np.sort(together), np.arange(num_images))  # covers every image once
        assert len(_loaded_shard(num_images, batch, 0, world, False)) == batches_per_epoch(num_images, batch, False, world)


def _loaded_shard(num_images: int, batch: int, rank: int, world: int, drop_last: bool):
    images = torch.arange(num_images, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    labelled = TensorImageSet(images, np.arange(num_images) % 5, [str(c) for c in range(5)])
    loader = BatchLoader(labelled, batch, shuffle=True, seed=7, epoch=2, drop_last=drop_last, rank=rank, world_size=world)
    expected = shard_batches(num_images, batch, shuffle=True, seed=7, epoch=2, drop_last=drop_last, rank=rank, world_size=world)
    got = list(loader)
    # The in-memory fast path returns exactly the shard's images, in order.
    assert [b.images[:, 0, 0, 0].tolist() for b in got] == [list(e) for e in expected]
    assert all(b.images.shape[1] == 3 for b in got)
    return got


def test_the_order_options_have_one_definition_shared_by_loader_and_shards():
    # BatchOrder is the one list of the order options (issue 15); BatchLoader and shard_batches take
    # exactly its fields, reach the same batches, and refuse anything else as before.
    options = dict(shuffle=True, seed=3, epoch=1, start_batch=2, drop_last=True, rank=1, world_size=2)
    images = torch.arange(41, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    labelled = TensorImageSet(images, np.arange(41) % 5, [str(c) for c in range(5)])
    expected = BatchOrder(**options).batches(41, 4)
    assert [list(b) for b in shard_batches(41, 4, **options)] == [list(e) for e in expected]
    loader = BatchLoader(labelled, 4, **options)
    assert [b.images[:, 0, 0, 0].tolist() for b in loader] == [list(e) for e in expected]
    assert (loader.seed, loader.epoch, loader.rank, loader.start_batch) == (3, 1, 1, 2)
    with pytest.raises(TypeError):
        BatchLoader(labelled, 4, shuffle=True, shuffled=True)
    with pytest.raises(TypeError):
        shard_batches(41, 4, seed=1)  # shuffle has no default, as before
    with pytest.raises(PretextlabError, match="start_batch must lie in"):
        BatchOrder(shuffle=False, start_batch=99).batches(41, 4)


def test_batches_per_epoch_matches_what_the_loader_yields(fmnist):
    subset = fmnist.val.subset(np.arange(101))
    for batch, drop_last, world in ((10, False, 1), (10, True, 1), (7, False, 4), (7, True, 4), (200, False, 1), (200, True, 1)):
        for rank in range(world):
            loader = BatchLoader(subset, batch, shuffle=False, drop_last=drop_last, rank=rank, world_size=world)
            assert len(list(loader)) == len(loader)
        assert len(BatchLoader(subset, batch, shuffle=False, drop_last=drop_last, world_size=world)) == batches_per_epoch(101, batch, drop_last, world)
    unshuffled = list(BatchLoader(subset, 50, shuffle=False))
    np.testing.assert_array_equal(torch.cat([b.labels for b in unshuffled]).numpy(), subset.labels)


# -- few labels ------------------------------------------------------------------------------------


def test_few_label_subsets_are_balanced_nested_and_deterministic(fmnist):
    labels = fmnist.train.labels
    ten = few_label_subset(labels, per_class=10, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[ten]), [10] * 10)
    hundred = few_label_subset(labels, per_class=100, seed=0)
    assert np.isin(ten, hundred).all() and len(hundred) == 1000
    np.testing.assert_array_equal(ten, few_label_subset(labels, per_class=10, seed=0))
    assert not np.array_equal(ten, few_label_subset(labels, per_class=10, seed=1))
    one_percent = few_label_subset(labels, fraction=0.01, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[one_percent]), [54] * 10)
    assert np.isin(one_percent, few_label_subset(labels, fraction=0.1, seed=0)).all()
    assert np.isin(ten, one_percent).all()  # per_class and fraction share one order
    # Uneven classes: a fraction of each class, at least one image.
    uneven = np.repeat(np.arange(4), [3, 50, 200, 1])
    picked = few_label_subset(uneven, fraction=0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(uneven[picked]), [1, 5, 20, 1])
    with pytest.raises(PretextlabError, match=r"class number 3 has in the training split \(1\)"):
        few_label_subset(uneven, per_class=2)
    with pytest.raises(PretextlabError, match="exactly one"):
        few_label_subset(uneven, per_class=1, fraction=0.5)
    with pytest.raises(PretextlabError, match="fraction"):
        few_label_subset(uneven, fraction=1.5)


def test_an_explicit_data_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path):
    env_root = tmp_path / "env"
    env_root.mkdir()
    for stem in fashion_mnist.FILES.values():
        (env_root / f"{stem}.gz").symlink_to(FASHION_DIR / f"{stem}.gz")
    env = {fashion_mnist.ENV_VAR: str(env_root)}
    missing = tmp_path / "typo"
    with pytest.raises(PretextlabError, match=f"--data-dir {missing} does not exist"):
        fashion_mnist.locate_fashion_mnist(missing, environment=env, download=False)
    with pytest.raises(PretextlabError, match="--data-dir .*typo does not exist"):
        load_dataset("fashion-mnist", data_dir=str(missing), limit=100, download=True)  # nor a download into it
    # An existing folder without the files is not silently replaced by another copy either.
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretextlabError, match="empty"):
        fashion_mnist.locate_fashion_mnist(tmp_path / "empty", environment=env, download=False)
    assert fashion_mnist.locate_fashion_mnist(env_root, environment={}, download=False) == env_root


def test_folder_symlink_loops_and_cross_class_links_count_each_image_once(image_root, caplog):
    (image_root / "train" / "ant" / "loop").symlink_to(".", target_is_directory=True)  # ln -s . train/ant/loop
    (image_root / "train" / "bee" / "up").symlink_to("..", target_is_directory=True)  # into the split: every class
    (image_root / "train" / "cat" / "ants").symlink_to(image_root / "train" / "ant", target_is_directory=True)
    elsewhere = image_root.parent / "more-ants"
    elsewhere.mkdir()
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(elsewhere / "extra.png")
    (image_root / "train" / "ant" / "more").symlink_to(elsewhere, target_is_directory=True)  # a new folder: followed once
    with caplog.at_level(logging.WARNING, logger="pretextlab.data.folder"):
        splits = load_dataset("folder", data_dir=str(image_root), image_size=8, val_size=3, seed=0)
    assert len(splits.train) + len(splits.val) == 18 + 1
    labels = np.concatenate([splits.train.labels, splits.val.labels])
    np.testing.assert_array_equal(np.bincount(labels), [6, 5, 8])  # ant: 5 + extra.png; cat: 5 + 3 bad files
    paths = [str(splits.train.path(i)) for i in range(len(splits.train))] + [str(splits.val.path(i)) for i in range(len(splits.val))]
    assert len(set(os.path.realpath(p) for p in paths)) == len(paths)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "did not follow 3 folder symlinks" in warned
    for link in ("ant/loop", "bee/up", "cat/ants"):
        assert link in warned


def test_two_class_folders_that_are_one_folder_are_refused(image_root):
    (image_root / "train" / "dog").symlink_to(image_root / "train" / "ant", target_is_directory=True)
    with pytest.raises(PretextlabError, match=r"class folders .*ant and .*dog are the same folder"):
        load_dataset("folder", data_dir=str(image_root))


def test_messages_name_the_flags_and_folders_a_user_typed(image_root):
    splits = load_dataset("folder", data_dir=str(image_root), image_size=8, val_size=3, seed=0)
    with pytest.raises(PretextlabError) as caught:
        few_label_subset(splits.train.labels, per_class=5, class_names=splits.train.class_names)
    message = str(caught.value)
    assert "--labels-per-class 5" in message and "class 'ant'" in message and "per_class" not in message
    with pytest.raises(PretextlabError, match="--label-fraction must lie in"):
        few_label_subset(splits.train.labels, fraction=1.5)
    with pytest.raises(PretextlabError, match="--test-limit 99 is more than the 6 images"):
        load_dataset("folder", data_dir=str(image_root), val_size=3, test_limit=99)
    with pytest.raises(PretextlabError, match=r"--val-size must be"):
        resolve_val_count(1.5, 100)
    for internal in ("per_class", "num_classes", "test_limit", "val_size"):
        for bad in ({"per_class": 0}, {"per_class": 1, "fraction": 0.5}):
            with pytest.raises(PretextlabError) as caught:
                few_label_subset(splits.train.labels, **bad)
            assert internal not in str(caught.value)


@pytest.mark.parametrize(("per_class", "fraction", "tag"), [(None, None, "all"), (25, None, "25pc"), (None, 0.1, "0.1frac")])
def test_a_label_budget_has_one_name_in_results_and_study_plans(per_class, fraction, tag):
    # Issue 15: one function names a label budget, so a probe's result file and the study's planned
    # row (which must match to be found in the store) cannot drift apart.
    from pretextlab.data import label_budget_tag
    from pretextlab.evaluate.probe_run import EvalConfig
    from pretextlab.study.model import LabelBudget

    assert label_budget_tag(per_class, fraction) == tag
    assert EvalConfig(labels_per_class=per_class, label_fraction=fraction).label_tag() == tag
    assert LabelBudget(per_class=per_class, fraction=fraction).tag == tag
