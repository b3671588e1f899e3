"""The L-BFGS probe data-parallel over 2 ranks (torchrun, gloo) against one process, on real
Fashion-MNIST pixels: same L2 chosen, same accuracies, same weights; each rank holds half the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretextlab.data import load_dataset
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.lbfgs import LbfgsConfig, fit_lbfgs_probe

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
WORKERS = Path(__file__).parent / "workers"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _pixels14(images) -> tuple[np.ndarray, np.ndarray]:
    """14x14 means of 2x2 pixels (196-d), float32, as a feature cache holds them."""
    batch, labels = images.take(np.arange(len(images)))
    x = batch[:, 0].float().numpy().reshape(len(images), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(images), -1)
    return x.astype(np.float32), labels.numpy()


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory) -> Path:
    """Train (601 rows: an odd count, so the ranks' blocks differ in size), val and test features as .npy files."""
    splits = load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=28, limit=801, val_size=200, test_limit=300, download=False)
    folder = tmp_path_factory.mktemp("features")
    for name, images in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        x, y = _pixels14(images)
        np.save(folder / f"{name}_x.npy", x)
        np.save(folder / f"{name}_y.npy", y)
    return folder


@pytest.mark.slow  # two torchrun processes start (about 2 s of CPU each): 10-17 s on the shared 2 cores
def test_two_ranks_choose_and_score_as_one_process_with_half_the_rows_each(feature_files, tmp_path):
    settings = dict(l2_grid=[1e-1, 1e-2, 1e-3], max_iter=60, device="cpu")
    done = subprocess.run(
        _torchrun(str(WORKERS / "lbfgs_shard.py"), str(feature_files), str(tmp_path), json.dumps(settings)),
        capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    splits = [(np.load(feature_files / f"{s}_x.npy", mmap_mode="r"), np.load(feature_files / f"{s}_y.npy")) for s in ("train", "val", "test")]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, weight, bias = fit_lbfgs_probe(
            ProbeData(*splits, num_classes=10), LbfgsConfig(**settings), progress=False, dtype=torch.float64
        )
    finally:
        torch.set_num_threads(previous)
    for rank in ranks:
        result = rank["result"]
        assert result["chosen"] == one.chosen
        assert result["val_top1_percent"] == one.val_top1_percent
        assert result["test_top1_percent"] == one.test_top1_percent
        assert [s["val_top1_percent"] for s in result["per_setting"]] == [s["val_top1_percent"] for s in one.per_setting]
        # Float64 throughout: the two runs differ only in the order of the all-reduced sums
        # (~1e-16 relative), which L-BFGS's steps carry to the optimum without amplifying past 1e-5.
        torch.testing.assert_close(rank["weight"], weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(rank["bias"], bias, rtol=0, atol=1e-5)
    assert 60 < one.test_top1_percent < 95  # a real fit, not a degenerate one
    # Each rank held its block of the 601 training rows (300 and 301), not the whole split.
    whole_bytes = 601 * 196 * 8
    held = [rank["result"]["settings"]["rank_feature_bytes"] for rank in ranks]
    assert held == [300 * 196 * 8, 301 * 196 * 8]
    assert sum(held) == whole_bytes
    assert [rank["result"]["settings"]["world_size"] for rank in ranks] == [2, 2]
