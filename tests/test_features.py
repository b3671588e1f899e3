"""Feature extraction: the study's pooling rule, view averaging, the on-disk cache and its resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretextlab.data import load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.features import FeatureSet, extract_features, pool_size, pool_to_budget, pooled_dim
from pretextlab.models import build_network
from pretextlab.tasks import TaskOptions, build_task

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


# ---------------------------------------------------------------- the pooling rule


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((64, 8, 8), 4096),  # below the budget: untouched
        ((10, 30, 30), 9000),  # exactly at the budget: untouched
        ((9000,), 9000),  # a vector passes through
        ((10, 30, 31), 10 * 15 * 15),  # just above: ceil(sqrt(9300/9000)) = 2
        ((64, 15, 15), 64 * 7 * 7),  # 'VALID' pooling drops the window that does not fit
        ((490, 30, 30), 490 * 4 * 4),  # ratio exactly 49: kernel exactly 7, no float rounding up to 8
        ((256, 56, 56), 256 * 5 * 5),  # ResNet50 k=4 block1 at 224: kernel 10
        ((512, 28, 28), 512 * 4 * 4),  # block2: kernel ceil(sqrt(44.6)) = 7
        ((2048, 7, 7), 2048),  # block4: kernel 4 -> 1x1
        ((20000, 2, 2), 20000),  # kernel 3 clamped to the map side 2: one value per channel remains
    ],
)
def test_pooled_dim_follows_the_study_rule(shape: tuple[int, ...], expected: int) -> None:
    assert pooled_dim(shape) == expected
    batch = torch.randn(2, *shape)
    assert pool_to_budget(batch).shape == (2, expected)


def test_pool_size_at_and_around_the_budget() -> None:
    assert pool_size(10, 30, 30, budget=9000) == 1
    assert pool_size(10, 30, 30, budget=8999) == 2
    assert pool_size(1, 4, 4, budget=4) == 2  # ratio exactly 4
    assert pool_size(1, 4, 4, budget=3) == 3  # ratio 5.33 -> ceil(2.31) = 3


def test_pool_to_budget_takes_window_maxima() -> None:
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert pool_to_budget(x, budget=4).tolist() == [[5.0, 7.0, 13.0, 15.0]]
    vector = torch.randn(3, 20000)
    assert pool_to_budget(vector) is vector  # 2-d outputs are never pooled


def test_pooling_rejects_bad_input() -> None:
    with pytest.raises(PretextlabError, match="one example"):
        pooled_dim((8, 64, 8, 8))
    with pytest.raises(PretextlabError, match="budget"):
        pooled_dim((64, 8, 8), budget=0)
    with pytest.raises(PretextlabError, match=r"\(B, C, H, W\)"):
        pool_to_budget(torch.randn(2, 3, 4))


# ---------------------------------------------------------------- extraction and its cache


@pytest.fixture(scope="module")
def splits():
    return load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=32, limit=200, test_limit=50, download=False)


@pytest.fixture(scope="module")
def network_and_views():
    torch.manual_seed(0)
    network = build_network("resnet50v1", width=1)
    task = build_task("rotation", network.out_dim, TaskOptions(image_size=32))
    return network, task.eval_views


class ForwardCounter:
    """A forward hook that counts network calls, and can fail after a number of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, module, inputs, outputs) -> None:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")


def _extract(network, views, images, tmp_path, **options) -> dict[str, FeatureSet]:
    settings = dict(outputs=("block1", "pre_logits"), split="train", preprocessing_key="rot-k1", batch_size=32, budget=1000, progress=False)
    settings.update(options)
    return extract_features(network, views, images, cache_dir=tmp_path, **settings)


def test_features_match_a_direct_forward_pass_pooled(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views
    sets = _extract(network, views, splits.train, tmp_path)
    assert set(sets) == {"block1", "pre_logits"}
    block1, pre_logits = sets["block1"], sets["pre_logits"]
    # block1 of a width-1 network at 32 px is (64, 8, 8) = 4096 values; budget 1000 -> kernel 3 -> 64*2*2.
    assert block1.features.shape == (len(splits.train), 256)
    assert pre_logits.features.shape == (len(splits.train), 512)
    assert block1.features.dtype == np.float32 and isinstance(block1.features, np.memmap)
    np.testing.assert_array_equal(block1.labels, splits.train.labels)
    assert block1.path == tmp_path / "rot-k1" / "train" / "block1.npy"

    images, _ = splits.train.take(np.arange(40, 45))
    network.eval()
    with torch.no_grad():
        direct = network(views(images)[0])
    expected_block1 = F.max_pool2d(direct["block1"], 3, 3).flatten(1).numpy()
    np.testing.assert_allclose(block1.features[40:45], expected_block1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pre_logits.features[40:45], direct["pre_logits"].numpy(), rtol=1e-4, atol=1e-5)


def test_views_of_an_image_are_pooled_then_averaged(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views

    def image_and_mirror(images: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = views(images)[0]
        both = torch.stack([x, x.flip(-1)], dim=1)  # image-major: the 2 views of an image are adjacent
        return both.reshape(-1, *x.shape[1:]), 2

    subset = splits.val
    sets = _extract(network, image_and_mirror, subset, tmp_path, split="val")
    images, _ = subset.take(np.arange(len(subset)))
    network.eval()
    with torch.no_grad():
        x = views(images)[0]
        plain, mirrored = network(x), network(x.flip(-1))
    for output in ("block1", "pre_logits"):
        expected = (pool_to_budget(plain[output], 1000) + pool_to_budget(mirrored[output], 1000)) / 2
        np.testing.assert_allclose(sets[output].features, expected.numpy(), rtol=1e-4, atol=1e-5)
    # The two views really differ, so averaging them is visible in the result.
    assert not np.allclose(sets["block1"].features, pool_to_budget(plain["block1"], 1000).numpy(), atol=1e-3)


def test_a_complete_cache_is_returned_without_running_the_network(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views
    counter = ForwardCounter()
    handle = network.register_forward_hook(counter)
    try:
        first = _extract(network, views, splits.train, tmp_path)
        assert counter.calls == 6  # 180 images in batches of 32
        second = _extract(network, views, splits.train, tmp_path)
        assert counter.calls == 6  # nothing ran the second time
    finally:
        handle.remove()
    for output in first:
        np.testing.assert_array_equal(first[output].features, second[output].features)
    meta = json.loads((tmp_path / "rot-k1" / "train" / "meta.json").read_text())
    state = meta["outputs"]["pre_logits"]
    assert {k: state[k] for k in ("batches_done", "rows_done", "dim", "complete")} == {
        "batches_done": 6, "rows_done": 180, "dim": 512, "complete": True}
    assert state["integrity"]["bytes"] == (tmp_path / "rot-k1" / "train" / "pre_logits.npy").stat().st_size


def test_an_interrupted_extraction_resumes_to_the_same_result(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views
    reference = _extract(network, views, splits.train, tmp_path / "uninterrupted")

    failing = ForwardCounter(fail_after=2)
    handle = network.register_forward_hook(failing)
    try:
        with pytest.raises(KeyboardInterrupt):
            _extract(network, views, splits.train, tmp_path / "interrupted")
    finally:
        handle.remove()
    meta = json.loads((tmp_path / "interrupted" / "rot-k1" / "train" / "meta.json").read_text())
    assert meta["outputs"]["block1"]["batches_done"] == 2 and not meta["outputs"]["block1"]["complete"]

    counter = ForwardCounter()
    handle = network.register_forward_hook(counter)
    try:
        # A different batch size is ignored on resume: the batches must be the ones already started.
        resumed = _extract(network, views, splits.train, tmp_path / "interrupted", batch_size=50)
    finally:
        handle.remove()
    assert counter.calls == 4  # only the 4 batches not yet recorded
    for output in reference:
        np.testing.assert_array_equal(resumed[output].features, reference[output].features)
        np.testing.assert_array_equal(resumed[output].labels, reference[output].labels)


def test_a_new_output_is_added_to_a_complete_cache(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views
    before = _extract(network, views, splits.val, tmp_path, split="val", outputs=("pre_logits",))
    kept = np.array(before["pre_logits"].features)
    both = _extract(network, views, splits.val, tmp_path, split="val", outputs=("pre_logits", "block3"))
    assert both["block3"].features.shape == (len(splits.val), pooled_dim((256, 2, 2), 1000))
    np.testing.assert_array_equal(both["pre_logits"].features, kept)
    np.testing.assert_array_equal(both["block3"].labels, splits.val.labels)


def test_the_cache_refuses_other_images_and_bad_requests(splits, network_and_views, tmp_path) -> None:
    network, views = network_and_views
    _extract(network, views, splits.val, tmp_path, split="val")
    with pytest.raises(PretextlabError, match="other images"):
        _extract(network, views, splits.test, tmp_path, split="val")  # same key and split, other images
    with pytest.raises(PretextlabError, match="no output"):
        _extract(network, views, splits.val, tmp_path, outputs=("fc7",))
    with pytest.raises(PretextlabError, match="split"):
        _extract(network, views, splits.val, tmp_path, split="../elsewhere")
    with pytest.raises(PretextlabError, match="B\\*V"):
        _extract(network, lambda images: (views(images)[0], 2), splits.val, tmp_path / "bad-views", split="val")
