"""The L-BFGS probe's whitening from fewer rows than features (the N x N side) is the same probe as
from the D x D matrix: real Fashion-MNIST pixels, fitted in float64 so that "the same" means
float64 rounding, whatever the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretextlab.data import load_dataset
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.lbfgs import LbfgsConfig, Whitening, fit_lbfgs_probe, fit_logistic_regression

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small fits on a shared 2-core machine: threads only wait on each other
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pixels() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw 28x28 pixels (784-d, float64): 360 train, 40 val, 300 test images."""
    splits = load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=28, limit=400, test_limit=300, download=False)
    out = {}
    for name in ("train", "val", "test"):
        images = getattr(splits, name)
        batch, labels = images.take(np.arange(len(images)))
        out[name] = (batch[:, 0].reshape(len(images), -1).double().numpy(), labels.numpy())
    return out


def _probe(train, val, test, gram: bool):
    config = LbfgsConfig(l2_grid=(1e1, 1e-1, 1e-3, 1e-5), max_iter=200, device="cpu")
    data = ProbeData(train, val, test, num_classes=10)
    return fit_lbfgs_probe(data, config, progress=False, dtype=torch.float64, gram=gram)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fewer_rows_than_features_fit_the_same_probe_as_the_d_by_d_matrix(pixels) -> None:
    x, y = pixels["train"]
    train = (x[:100], y[:100])  # 100 rows of 784 values, every class present
    standardised = torch.from_numpy((train[0] - train[0].mean(0)) / np.where(train[0].std(0) > 0, train[0].std(0), 1))
    rows_whitening, full_whitening = Whitening.of(standardised), Whitening.of(standardised, gram=False)
    kept = rows_whitening.eigenvectors.shape[1]
    assert rows_whitening.eigenvectors.shape[0] == 784 and kept <= 99  # the rows' span: centred, rank <= N - 1
    assert full_whitening.eigenvectors.shape == (784, 784)
    # The same nonzero spectrum, and the same damping floor (its mean counts the null space's zeros).
    top = full_whitening.eigenvalues.sort(descending=True).values
    assert torch.allclose(rows_whitening.eigenvalues.sort(descending=True).values, top[:kept], rtol=0, atol=1e-12 * float(top[0]))
    assert float(top[kept:].max()) <= 1e-12 * float(top[0])
    assert rows_whitening.null_scale(0.0) == pytest.approx(float(full_whitening.scales(0.0).max()), rel=1e-9)

    (gram, gram_w, gram_b), (full, full_w, full_b) = (_probe(train, pixels["val"], pixels["test"], gram) for gram in (True, False))
    assert gram.chosen == full.chosen
    assert gram.val_top1_percent == full.val_top1_percent and gram.test_top1_percent == full.test_top1_percent
    assert [s["val_top1_percent"] for s in gram.per_setting] == [s["val_top1_percent"] for s in full.per_setting]
    assert [s["iterations"] for s in gram.per_setting] == [s["iterations"] for s in full.per_setting]
    assert _relative(gram_w, full_w) <= 1e-8 and _relative(gram_b, full_b) <= 1e-8


def test_more_rows_than_features_keep_the_d_by_d_path(pixels) -> None:
    def shrink(x: np.ndarray) -> np.ndarray:  # 2x2 pixel means: 196 values
        return x.reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)

    (x, y), val, test = ((shrink(x), y) for x, y in (pixels["train"], pixels["val"], pixels["test"]))
    shrunk = x  # 360 rows of 196 values
    standardised = torch.from_numpy((shrunk - shrunk.mean(0)) / np.where(shrunk.std(0) > 0, shrunk.std(0), 1))
    whitening = Whitening.of(standardised)
    values, vectors = torch.linalg.eigh(torch.mm(standardised.t(), standardised).div_(float(len(x))))
    assert torch.equal(whitening.eigenvectors, vectors) and torch.equal(whitening.eigenvalues, values.clamp_min(0.0))
    (auto, auto_w, _), (full, full_w, _) = (_probe((shrunk, y), val, test, gram) for gram in (True, False))
    assert auto.to_dict()["per_setting"] == [dict(s, seconds=a["seconds"]) for s, a in zip(full.per_setting, auto.per_setting)]
    assert torch.equal(auto_w, full_w)


def test_a_start_outside_the_rows_span_is_kept_as_the_d_by_d_fit_keeps_it(pixels) -> None:
    # With l2 = 0 the data term never moves W outside the training rows' span, so a start's part
    # there must survive the fit unchanged: dropped, val/test logits would change. l2 = 0 puts the
    # damping at its floor (1e-6 of the mean eigenvalue), so those directions' scale is ~1e3 and
    # float64 rounding grows by ~1e6 along the path: hence 1e-6, not 1e-12.
    x, y = pixels["train"]
    x = torch.from_numpy((x[:60] - x[:60].mean(0)) / np.where(x[:60].std(0) > 0, x[:60].std(0), 1))
    start = (torch.from_numpy(np.random.default_rng(0).normal(0.0, 0.01, size=(10, 784))), torch.zeros(10, dtype=torch.float64))
    settings = dict(num_classes=10, l2=0.0, max_iter=15, tolerance=1e-6, history_size=10, init=start)
    rows_whitening = Whitening.of(x)
    gram_w, _, _ = fit_logistic_regression(x, y[:60], whitening=rows_whitening, **settings)
    full_w, _, _ = fit_logistic_regression(x, y[:60], whitening=Whitening.of(x, gram=False), **settings)
    basis = rows_whitening.eigenvectors

    def outside(w: torch.Tensor) -> torch.Tensor:
        return w - w @ basis @ basis.t()

    assert float(outside(start[0]).norm()) > 0.1
    assert _relative(outside(gram_w), outside(start[0])) <= 1e-6
    assert _relative(gram_w, full_w) <= 1e-5
