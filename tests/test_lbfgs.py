"""The L-BFGS logistic-regression probe on real Fashion-MNIST pixels, checked against scikit-learn."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from pretextlab.data import load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.lbfgs import LbfgsConfig, ProbeResult, Whitening, fit_logistic_regression, lbfgs_probe

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for this module, restored after: on the shared 2-core test machine,
    OpenMP threads that wait on each other while other processes hold the cores made these
    small fits several times slower (results are the same either way)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _pixels(images) -> tuple[np.ndarray, np.ndarray]:
    batch, labels = images.take(np.arange(len(images)))
    return batch[:, 0].reshape(len(images), -1).float().numpy(), labels.numpy()


@pytest.fixture(scope="module")
def pixels():
    """Raw 28x28 pixels (784-d): 2,700 train, 300 val, 1,000 test images."""
    splits = load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=28, limit=3000, test_limit=1000, download=False)
    return _pixels(splits.train), _pixels(splits.val), _pixels(splits.test)


@pytest.fixture(scope="module")
def standardized(pixels):
    """The same images at 14x14 (2x2 pixel means, 196-d), standardised: a smaller problem, so that
    scikit-learn's float64 solver keeps this file fast on a shared CPU."""
    (train_x, train_y), _, (test_x, test_y) = pixels

    def shrink(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)

    train_x, test_x = shrink(train_x), shrink(test_x)
    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def test_probe_on_raw_pixels_is_accurate_and_chooses_on_val(pixels) -> None:
    train, val, test = pixels
    config = LbfgsConfig(l2_grid=(1e-4, 1e-1, 1e-2), max_iter=100, device="cpu")
    result = lbfgs_probe(ProbeData(train, val, test, num_classes=10), config=config, progress=False)
    assert isinstance(result, ProbeResult) and result.probe == "lbfgs"
    assert [s["l2"] for s in result.per_setting] == [1e-1, 1e-2, 1e-4]  # strongest first
    assert result.test_top1_percent > 75
    assert 1 < result.val_top1_percent <= 100 and 1 < result.test_top1_percent <= 100  # percent, not fractions
    val_scores = [s["val_top1_percent"] for s in result.per_setting]
    assert result.val_top1_percent == max(val_scores)
    assert result.chosen == {"l2": result.per_setting[val_scores.index(max(val_scores))]["l2"]}  # first best = strongest
    assert result.train_size == len(train[1])
    json.dumps(result.to_dict())  # storable as it is

    # Scored on the training images themselves, the weakest L2 wins: the choice really follows `val`.
    on_train = lbfgs_probe(ProbeData(train, train, test, num_classes=10), config=config, progress=False)
    assert on_train.chosen == {"l2": 1e-4}
    assert on_train.val_top1_percent > result.val_top1_percent


def test_fit_agrees_with_scikit_learn_at_the_same_c(standardized) -> None:
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    train_x, train_y, test_x, test_y = standardized
    l2 = 1e-2
    weight, bias, info = fit_logistic_regression(
        torch.from_numpy(train_x), train_y, 10, l2, max_iter=500, tolerance=1e-5, history_size=50
    )
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):  # one BLAS thread: steady on a shared CPU
        warnings.simplefilter("ignore")  # a convergence warning, should sklearn stop at max_iter
        reference = sklearn_linear.LogisticRegression(C=1 / (len(train_x) * l2), max_iter=500, tol=1e-5).fit(train_x, train_y)
    assert reference.n_iter_[0] < 500  # sklearn converged too: the two optima are comparable

    def objective(w: np.ndarray, b: np.ndarray) -> float:
        logits = train_x.astype(np.float64) @ w.T + b
        logits -= logits.max(1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return float(-log_probs[np.arange(len(train_y)), train_y].mean() + l2 / 2 * (w**2).sum())

    ours_objective = objective(weight.numpy().astype(np.float64), bias.numpy().astype(np.float64))
    assert info["loss"] == pytest.approx(ours_objective, rel=1e-4)
    assert ours_objective == pytest.approx(objective(reference.coef_, reference.intercept_), rel=1e-3)
    ours_test = float(((torch.from_numpy(test_x) @ weight.T + bias).argmax(1).numpy() == test_y).mean())
    assert abs(ours_test - reference.score(test_x, test_y)) <= 0.01


def test_warm_start_needs_fewer_iterations(standardized) -> None:
    train_x, train_y, _, _ = standardized
    x = torch.from_numpy(train_x)
    settings = dict(max_iter=400, tolerance=1e-4, history_size=50)
    stronger = fit_logistic_regression(x, train_y, 10, 1e-2, **settings)
    cold = fit_logistic_regression(x, train_y, 10, 3e-3, **settings)
    warm = fit_logistic_regression(x, train_y, 10, 3e-3, init=stronger[:2], **settings)
    assert cold[2]["converged"] and warm[2]["converged"]
    assert warm[2]["iterations"] < cold[2]["iterations"]
    assert warm[2]["loss"] == pytest.approx(cold[2]["loss"], rel=1e-3)


def test_whitening_reaches_the_same_optimum_in_fewer_iterations(standardized) -> None:
    train_x, train_y, _, _ = standardized
    x = torch.from_numpy(train_x)
    whitening = Whitening.of(x)
    assert torch.allclose(whitening.eigenvalues.sum(), torch.tensor(float(train_x.shape[1])), rtol=1e-3)  # trace of a correlation matrix
    settings = dict(max_iter=500, tolerance=1e-5, history_size=50)
    plain = fit_logistic_regression(x, train_y, 10, 1e-3, **settings)
    whitened = fit_logistic_regression(x, train_y, 10, 1e-3, whitening=whitening, **settings)
    assert plain[2]["converged"] and whitened[2]["converged"]
    assert whitened[2]["grad_max"] <= 1e-5  # the tolerance holds for the gradient in W itself
    assert whitened[2]["loss"] == pytest.approx(plain[2]["loss"], rel=1e-4)
    assert whitened[2]["iterations"] < plain[2]["iterations"]
    agreement = ((x @ whitened[0].T + whitened[1]).argmax(1) == (x @ plain[0].T + plain[1]).argmax(1)).float().mean()
    assert agreement > 0.99


def test_bad_input_is_refused_with_a_clear_message(pixels) -> None:
    train, val, test = pixels
    config = LbfgsConfig(l2_grid=(1e-2,), max_iter=5, device="cpu")

    def probe(train=train, val=val, test=test, num_classes=10):
        return lbfgs_probe(ProbeData(train, val, test, num_classes=num_classes), config=config, progress=False)

    with pytest.raises(PretextlabError, match="one label per row"):
        probe(train=(train[0], train[1][:-1]))
    missing = train[1] != 3
    with pytest.raises(PretextlabError, match="class 3 has no training example"):
        probe(train=(train[0][missing], train[1][missing]))
    with_nan = val[0].copy()
    with_nan[5, 100] = np.nan
    with pytest.raises(PretextlabError, match="NaN"):
        probe(val=(with_nan, val[1]))
    with_inf = train[0].copy()
    with_inf[0, 0] = np.inf
    with pytest.raises(PretextlabError, match="NaN or infinite"):
        probe(train=(with_inf, train[1]))
    with pytest.raises(PretextlabError, match="empty"):
        probe(test=(np.zeros((0, 784), np.float32), np.zeros(0, np.int64)))
    with pytest.raises(PretextlabError, match="different feature sizes"):
        probe(test=(test[0][:, :100], test[1]))
    with pytest.raises(PretextlabError, match=r"lie in \[0, 5\)"):
        probe(num_classes=5)
    with pytest.raises(PretextlabError, match="l2_grid"):
        LbfgsConfig(l2_grid=())
    with pytest.raises(PretextlabError, match="l2_grid"):
        LbfgsConfig(l2_grid=(1e-3, -1.0))
    with pytest.raises(PretextlabError, match="max_iter"):
        LbfgsConfig(max_iter=0)
    with pytest.raises(PretextlabError, match="device"):
        lbfgs_probe(ProbeData(train, val, test, 10), LbfgsConfig(device="tpu"), progress=False)


def test_one_standardisation_rule_a_column_constant_on_train_is_zeroed_for_every_probe():
    """Both probes share evaluate/common.py's rule: a column constant on train is scaled by 0, so
    whatever it holds in val/test (here 1e12) cannot move a prediction."""
    from pretextlab.evaluate.common import standardisation
    from pretextlab.evaluate.sgd import SgdConfig, sgd_probe

    rng = np.random.default_rng(0)
    def blobs(n):
        labels = rng.integers(0, 3, n)
        return rng.normal(size=(n, 4)) + labels[:, None], labels

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = blobs(150), blobs(60), blobs(60)
    mean, inv_std = standardisation(np.column_stack([train_x, np.full(150, 7.0)]), "train")
    assert inv_std[-1] == 0.0 and mean[-1] == 7.0 and (inv_std[:-1] > 0).all()

    def with_column(x, values):
        return np.column_stack([x, values]).astype(np.float32)

    # The same data, the extra column constant (7) everywhere or, in val/test only, wildly not.
    calm = ((with_column(train_x, np.full(150, 7.0)), train_y), (with_column(val_x, np.full(60, 7.0)), val_y),
            (with_column(test_x, np.full(60, 7.0)), test_y))
    wild = (calm[0], (with_column(val_x, rng.normal(0, 1e12, 60)), val_y), (with_column(test_x, rng.normal(0, 1e12, 60)), test_y))
    config = LbfgsConfig(l2_grid=(1e-2, 1e-4), device="cpu")
    a, b = lbfgs_probe(ProbeData(*calm, 3), config, progress=False), lbfgs_probe(ProbeData(*wild, 3), config, progress=False)
    assert a.val_top1_percent > 60 and (a.val_top1_percent, a.test_top1_percent) == (b.val_top1_percent, b.test_top1_percent)
    sgd = SgdConfig.paper("linear", device="cpu", batch_size=30, base_lr=2.0).scaled(5)
    c, d = sgd_probe(ProbeData(*calm, 3), sgd, progress=False), sgd_probe(ProbeData(*wild, 3), sgd, progress=False)
    assert c.val_top1_percent > 60 and (c.curve, c.test_top1_percent) == (d.curve, d.test_top1_percent)


def test_both_probes_take_their_splits_as_one_probe_data():
    # Issue 15: the splits and class count every precomputed-feature probe takes are one dataclass,
    # checked in one place, rather than the same four parameters in each probe.
    import inspect

    from pretextlab.evaluate.sgd import sgd_probe

    for probe in (lbfgs_probe, sgd_probe):
        first, *_ = inspect.signature(probe).parameters.values()
        assert (first.name, first.annotation) == ("data", "ProbeData")
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(PretextlabError, match="different feature sizes"):
        ProbeData((x, y), (np.zeros((2, 3)), y[:2]), (x, y), 2).checked()
    assert set(ProbeData((x, y), (x, y), (x, y), 2).checked()) == {"train", "val", "test"}
