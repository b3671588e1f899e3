"""The SGD linear and MLP probes on real Fashion-MNIST pixels: accuracy, schedule, resume, determinism."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pretextlab.data import load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.sgd import SgdConfig, SgdResult, sgd_probe

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _pixels(images) -> tuple[np.ndarray, np.ndarray]:
    batch, labels = images.take(np.arange(len(images)))
    return (batch[:, 0].reshape(len(images), -1).float() / 255).numpy(), labels.numpy()


@pytest.fixture(scope="module")
def pixels():
    """Raw 28x28 pixels scaled to [0, 1] (784-d): 2,700 train, 300 val, 1,000 test images."""
    splits = load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=28, limit=3000, test_limit=1000, download=False)
    return _pixels(splits.train), _pixels(splits.val), _pixels(splits.test)


@pytest.fixture(scope="module")
def small(pixels):
    """A quicker problem for the exactness tests: 800 train images, 300 val, 300 test."""
    (train_x, train_y), val, (test_x, test_y) = pixels
    return (train_x[:800], train_y[:800]), val, (test_x[:300], test_y[:300])


# A small MLP: dropout is active, so resume and determinism cover its random masks too.
SMALL_MLP = SgdConfig(kind="mlp", epochs=4, batch_size=64, decay_epochs=(2, 3), hidden=32, device="cpu")


def test_linear_probe_learns_fashion_mnist_and_reports_the_final_epoch(pixels) -> None:
    train, val, test = pixels
    config = SgdConfig.paper("linear", batch_size=256, device="cpu").scaled(5)
    result = sgd_probe(ProbeData(train, val, test, num_classes=10), config=config, progress=False)
    assert isinstance(result, SgdResult) and result.probe == "sgd"
    assert result.test_top1_percent > 75
    assert 1 < result.val_top1_percent <= 100 and 1 < result.test_top1_percent <= 100  # percent, not fractions
    assert [entry["epoch"] for entry in result.curve] == [1, 2, 3, 4, 5]
    assert set(result.curve[0]) == {"epoch", "lr", "train_loss", "val_top1_percent"}
    assert result.val_top1_percent == result.curve[-1]["val_top1_percent"]  # the final model's, not the best epoch's
    assert result.chosen["epoch"] == 5 and result.chosen["batch_size"] == 256
    assert result.chosen["lr"] == pytest.approx(0.1)  # 0.1 x 256 / 256
    assert result.chosen["best_val_top1_percent"] == max(e["val_top1_percent"] for e in result.curve)
    assert result.curve[-1]["train_loss"] < 0.7 * result.curve[0]["train_loss"]
    assert result.train_size == len(train[1])
    restored = json.loads(json.dumps(result.to_dict()))  # storable as it is
    assert restored["curve"] == result.curve and restored["probe"] == "sgd"


def test_mlp_probe_learns_fashion_mnist(pixels) -> None:
    train, val, test = pixels
    config = SgdConfig.paper("mlp", batch_size=256, device="cpu").scaled(4)
    result = sgd_probe(ProbeData(train, val, test, num_classes=10), config=config, progress=False)
    assert result.probe == "mlp"
    assert result.test_top1_percent > 78
    assert len(result.curve) == 4


def test_curve_lr_follows_the_schedule(small) -> None:
    train, val, test = small
    config = SgdConfig(epochs=6, batch_size=100, base_lr=0.1, decay_epochs=(2, 4), decay_factor=0.1, device="cpu")
    result = sgd_probe(ProbeData(train, val, test, num_classes=10), config=config, progress=False)
    peak = 0.1 * 100 / 256
    assert [e["lr"] for e in result.curve] == pytest.approx([peak, peak, peak / 10, peak / 10, peak / 100, peak / 100])

    # Warm-up over 2 epochs rises linearly per step: half the peak at the end of epoch 1.
    warm = dataclasses.replace(config, epochs=3, decay_epochs=(), warmup_epochs=2)
    curve = sgd_probe(ProbeData(train, val, test, num_classes=10), config=warm, progress=False).curve
    assert [e["lr"] for e in curve] == pytest.approx([peak / 2, peak, peak])
    steps_per_epoch = 800 // 100
    assert warm.learning_rate(0, steps_per_epoch, 100) == pytest.approx(peak / 16)
    assert config.learning_rate(2 * steps_per_epoch - 1, steps_per_epoch, 100) == pytest.approx(peak)
    assert config.learning_rate(2 * steps_per_epoch, steps_per_epoch, 100) == pytest.approx(peak / 10)


def test_same_seed_gives_identical_results_and_another_seed_does_not(small) -> None:
    train, val, test = small
    first = sgd_probe(ProbeData(train, val, test, 10), SMALL_MLP, progress=False)
    again = sgd_probe(ProbeData(train, val, test, 10), SMALL_MLP, progress=False)
    assert first.curve == again.curve and first.test_top1_percent == again.test_top1_percent
    other = sgd_probe(ProbeData(train, val, test, 10), dataclasses.replace(SMALL_MLP, seed=1), progress=False)
    assert [e["train_loss"] for e in other.curve] != [e["train_loss"] for e in first.curve]


def test_resume_after_an_interruption_ends_identical_to_an_uninterrupted_run(small, tmp_path) -> None:
    train, val, test = small
    uninterrupted = sgd_probe(ProbeData(train, val, test, 10), SMALL_MLP, progress=False)
    checkpoint = tmp_path / "probe.pt"

    class Interrupted(Exception):
        pass

    def stop_after_two(entry: dict) -> None:
        if entry["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        sgd_probe(ProbeData(train, val, test, 10), SMALL_MLP, progress=False, curve_callback=stop_after_two, checkpoint_path=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    seen: list[int] = []
    resumed = sgd_probe(
        ProbeData(train, val, test, 10), SMALL_MLP, progress=False, curve_callback=lambda e: seen.append(e["epoch"]), checkpoint_path=checkpoint
    )
    assert seen == [3, 4]  # only the remaining epochs were trained
    assert resumed.curve == uninterrupted.curve
    assert resumed.test_top1_percent == uninterrupted.test_top1_percent and resumed.val_top1_percent == uninterrupted.val_top1_percent

    # A finished checkpoint is only scored; one from another configuration is refused.
    finished = sgd_probe(ProbeData(train, val, test, 10), SMALL_MLP, progress=False, curve_callback=lambda e: seen.append(-1), checkpoint_path=checkpoint)
    assert seen == [3, 4] and finished.test_top1_percent == uninterrupted.test_top1_percent
    with pytest.raises(PretextlabError, match="another configuration"):
        sgd_probe(ProbeData(train, val, test, 10), dataclasses.replace(SMALL_MLP, seed=5), progress=False, checkpoint_path=checkpoint)


def test_streaming_from_a_memmap_matches_device_resident_features(small, tmp_path) -> None:
    (train_x, train_y), val, test = small
    path = tmp_path / "train.npy"
    np.save(path, train_x)
    on_disk = np.load(path, mmap_mode="r")
    assert isinstance(on_disk, np.memmap)
    config = dataclasses.replace(SMALL_MLP, epochs=2, decay_epochs=(1,))
    resident = sgd_probe(ProbeData((train_x, train_y), val, test, 10), dataclasses.replace(config, resident="device"), progress=False)
    streamed = sgd_probe(ProbeData((on_disk, train_y), val, test, 10), dataclasses.replace(config, resident="stream"), progress=False)
    assert streamed.curve == resident.curve and streamed.test_top1_percent == resident.test_top1_percent


def test_standardisation_uses_train_statistics_and_zeroes_columns_constant_on_train(small) -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = small
    config = dataclasses.replace(SMALL_MLP, kind="linear", epochs=3, decay_epochs=())

    def with_column(x: np.ndarray, column: np.ndarray) -> np.ndarray:
        return np.hstack([x, column[:, None]]).astype(np.float32)

    zeros = [np.zeros(len(x), np.float32) for x in (train_x, val_x, test_x)]
    plain = sgd_probe(
        ProbeData((with_column(train_x, zeros[0]), train_y), (with_column(val_x, zeros[1]), val_y),
                  (with_column(test_x, zeros[2]), test_y), 10),
        config, progress=False,
    )
    # An affine change of every pixel column (the same for all splits) disappears under the train
    # statistics; a column constant on train (7) but not elsewhere is zeroed: it cannot be learnt,
    # and left in, its never-trained random weights would turn its val/test values into noise.
    rng = np.random.default_rng(0)
    skewed = sgd_probe(
        ProbeData(
            (with_column(train_x * 300.0 + 40.0, zeros[0] + 7.0), train_y),
            (with_column(val_x * 300.0 + 40.0, rng.normal(7.0, 50.0, len(val_x))), val_y),
            (with_column(test_x * 300.0 + 40.0, rng.normal(7.0, 50.0, len(test_x))), test_y),
            10,
        ),
        config, progress=False,
    )
    for mine, theirs in zip(skewed.curve, plain.curve):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["val_top1_percent"] == pytest.approx(theirs["val_top1_percent"], abs=100 / 300)
    assert skewed.test_top1_percent == pytest.approx(plain.test_top1_percent, abs=200 / 300)

    # Unstandardised, pixels scaled by 1e19 overflow the logits: the run stops with advice, not NaNs.
    def huge(x: np.ndarray) -> np.ndarray:
        return (x * 1e19).astype(np.float32)

    with pytest.raises(PretextlabError, match="diverged in epoch 1"):
        sgd_probe(
            ProbeData((huge(train_x), train_y), (huge(val_x), val_y), (huge(test_x), test_y), 10),
            dataclasses.replace(config, standardize=False), progress=False,
        )


def test_presets_carry_the_study_numbers() -> None:
    for kind in ("linear", "mlp"):
        short = SgdConfig.paper(kind)
        assert (short.kind, short.epochs, short.batch_size, short.base_lr) == (kind, 70, 512, 0.1)
        assert short.decay_epochs == (30, 50) and short.decay_factor == 0.1 and short.momentum == 0.9
        assert short.warmup_epochs == 0 and short.weight_decay == 0.0
        assert short.peak_lr(short.batch_size) == pytest.approx(0.2)
        long = SgdConfig.paper_long(kind)
        assert (long.epochs, long.batch_size, long.decay_epochs) == (520, 2048, (480, 500))
        assert long.peak_lr(long.batch_size) == pytest.approx(0.8)
    mlp = SgdConfig.paper("mlp")
    assert (mlp.hidden, mlp.dropout) == (1000, 0.5)
    assert SgdConfig() == SgdConfig.paper("linear")

    seven = SgdConfig.paper("mlp").scaled(7)
    assert (seven.epochs, seven.decay_epochs, seven.batch_size, seven.kind) == (7, (3, 5), 512, "mlp")
    assert SgdConfig.paper_long().scaled(52).decay_epochs == (48, 50)
    assert SgdConfig.paper().scaled(10).decay_epochs == pytest.approx((30 / 7, 50 / 7))
    with pytest.raises(PretextlabError, match="epochs"):
        SgdConfig.paper().scaled(0)


def test_bad_configs_raise_with_the_fix() -> None:
    with pytest.raises(PretextlabError, match="linear, mlp"):
        SgdConfig(kind="svm")
    with pytest.raises(PretextlabError, match="base_lr"):
        SgdConfig(base_lr=-0.1)
    with pytest.raises(PretextlabError, match="decay_epochs"):
        SgdConfig(epochs=10, decay_epochs=(30, 50))
    with pytest.raises(PretextlabError, match="increasing"):
        SgdConfig(decay_epochs=(50, 30))
    with pytest.raises(PretextlabError, match="dropout"):
        SgdConfig(dropout=1.0)
    with pytest.raises(PretextlabError, match="batch_size"):
        SgdConfig(batch_size=0)
    with pytest.raises(PretextlabError, match="auto, device, stream"):
        SgdConfig(resident="gpu")


def test_bad_inputs_raise_with_the_fix(small) -> None:
    (train_x, train_y), val, test = small
    config = dataclasses.replace(SMALL_MLP, epochs=1, decay_epochs=())

    def probe(train=(train_x, train_y), val=val, test=test, num_classes=10):
        return sgd_probe(ProbeData(train, val, test, num_classes), config, progress=False)

    with pytest.raises(PretextlabError, match="one label per row"):
        probe(train=(train_x, train_y[:-1]))
    without_class_3 = train_y != 3
    with pytest.raises(PretextlabError, match="class 3 has no training example"):
        probe(train=(train_x[without_class_3], train_y[without_class_3]))
    poisoned = val[0].copy()
    poisoned[5, 17] = np.nan
    with pytest.raises(PretextlabError, match="val features contain NaN"):
        probe(val=(poisoned, val[1]))
    with pytest.raises(PretextlabError, match="empty"):
        probe(train=(train_x[:0], train_y[:0]))
    with pytest.raises(PretextlabError, match="different feature sizes"):
        probe(test=(test[0][:, :100], test[1]))
    with pytest.raises(PretextlabError, match=r"labels must lie in \[0, 5\)"):
        probe(num_classes=5)
    with pytest.raises(PretextlabError, match="SgdConfig"):
        sgd_probe(ProbeData((train_x, train_y), val, test, 10), {"kind": "linear"}, progress=False)  # type: ignore[arg-type]
