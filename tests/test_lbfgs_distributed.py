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


def test_half_precision_storage_reads_back_rounded_and_refuses_what_float16_cannot_hold(tmp_path):
    from pretextlab.errors import PretextlabError
    from pretextlab.evaluate.cache_files import Bfloat16Rows
    from pretextlab.evaluate.features import encoded

    values = np.array([[1.0, -3.140625, 1e30, 2.0**-130], [0.1, 65504.0, -1e-3, 7.0]], dtype=np.float32)
    bits = encoded(values, "bfloat16", "x")
    assert bits.dtype == np.uint16 and bits.nbytes == values.nbytes // 2
    np.save(tmp_path / "b.npy", bits)
    rows = Bfloat16Rows(np.load(tmp_path / "b.npy", mmap_mode="r"))
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()  # round to nearest even
    assert rows.shape == (2, 4) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[np.arange(2)], expected)
    np.testing.assert_array_equal(np.asarray(rows[1:], dtype=np.float64), expected[1:])  # a slice stays lazy
    assert isinstance(rows[1:], Bfloat16Rows)
    half = encoded(values[1:], "float16", "x")
    assert half.dtype == np.float16 and half[0, 1] == 65504.0
    with pytest.raises(PretextlabError, match="beyond float16's range.*--feature-dtype bfloat16"):
        encoded(values, "float16", "the train features of pre_logits")


SETTINGS = dict(l2_grid=[1e-1, 1e-2, 1e-3], max_iter=60, device="cpu")
# Any trained run serves (the evaluation, not the training, is compared): one step, no kNN monitor.
TRAIN = dict(
    task="rotation", network="resnet50v1", width=1, image_size=32, limit=320, val_size=32, test_limit=32,
    epochs=0.1, batch_size=32, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1, monitor_every=0,
)
EVAL_FLAGS = ["--limit", "300", "--val-size", "100", "--test-limit", "200", "--device", "cpu", "--l2-grid", "1e-2",
              "--batch-size", "64", "--feature-dtype", "bfloat16", "--no-progress"]


@pytest.fixture(scope="module")
def torchrun_jobs(feature_files, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path, Path]:
    """One torchrun launch (2 ranks) for both slow tests, so the ranks' start-up is paid once: each rank runs
    `pretextlab evaluate --run RUN` through cli.main (as `python -m pretextlab` does), then the float64 sharded
    L-BFGS fit on ``feature_files`` on the group the command joined (tests/workers/lbfgs_shard.py).
    Returns the launch, the rank{R}.pt folder, the evaluated run and an untouched copy of it."""
    import shutil

    from pretextlab.config import TrainConfig
    from pretextlab.training import Trainer

    root = tmp_path_factory.mktemp("torchrun")
    run, alone, ranks = root / "run", root / "alone", root / "ranks"
    ranks.mkdir()
    Trainer(TrainConfig(**TRAIN), run, progress=False).fit()
    shutil.copytree(run, alone)
    done = subprocess.run(
        # "--": torchrun would take --run for an abbreviation of its own --run-path (the worker drops it).
        _torchrun(str(WORKERS / "lbfgs_shard.py"), str(feature_files), str(ranks), json.dumps(SETTINGS),
                  "--", "evaluate", "--run", str(run), *EVAL_FLAGS),
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    return done, ranks, run, alone


@pytest.mark.slow  # shares the one torchrun launch (2 ranks, ~2.5 s of CPU each to start) with the evaluate test
def test_two_ranks_choose_and_score_as_one_process_with_half_the_rows_each(feature_files, torchrun_jobs):
    done, folder, _, _ = torchrun_jobs
    settings = SETTINGS
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]

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


@pytest.mark.slow  # a tiny training run, evaluate in the shared 2-rank torchrun launch, then in one process twice
def test_torchrun_evaluate_fills_one_cache_shard_by_shard_that_one_process_reuses(torchrun_jobs):
    from pretextlab.evaluate.probe_run import EvalConfig, evaluate_run

    done, _, run, alone = torchrun_jobs
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON document: rank 0's alone
    [sharded] = report["results"]
    assert len(list((run / "probes").glob("*.json"))) == 1
    # One cache per split, complete with its checksums, no rank's progress file left.
    [train_dir] = [d for d in (run / "features").glob("*/train")]
    meta = json.loads((train_dir / "meta.json").read_text())
    state = meta["outputs"]["pre_logits"]
    assert meta["feature_dtype"] == "bfloat16" and "sharded" not in meta and not list(train_dir.glob("shard*"))
    assert state["complete"] and state["rows_done"] == 200 and state["integrity"]["crc32"]
    cached = np.load(train_dir / "pre_logits.npy", mmap_mode="r")
    assert cached.dtype == np.uint16 and cached.shape == (200, state["dim"])  # bfloat16: 2 bytes a value
    written = {p.name: p.stat().st_mtime_ns for p in train_dir.iterdir()}

    # One process on the same run reuses that cache (nothing rewritten) and finds the same result.
    config = EvalConfig(limit=300, val_size=100, test_limit=200, device="cpu", l2_grid=(1e-2,), batch_size=64,
                        feature_dtype="bfloat16")
    [reused] = evaluate_run(run, config, progress=False, log=lambda message: None)
    assert {p.name: p.stat().st_mtime_ns for p in train_dir.iterdir()} == written
    assert (reused["chosen"], reused["test_top1_percent"]) == (sharded["chosen"], sharded["test_top1_percent"])
    # One process extracting alone writes the same rows (same batches; float32 sums may differ in
    # their last bit, which bfloat16 rounding can move by one bfloat16 step at most).
    [single] = evaluate_run(alone, config, progress=False, log=lambda message: None)
    [alone_dir] = [d for d in (alone / "features").glob("*/train")]
    from pretextlab.evaluate.cache_files import Bfloat16Rows

    ours, theirs = (Bfloat16Rows(np.load(d / "pre_logits.npy", mmap_mode="r"))[np.arange(200)] for d in (train_dir, alone_dir))
    np.testing.assert_allclose(ours, theirs, rtol=2**-7, atol=1e-30)
    # float32 probes on (nearly) the same features: a test image's prediction may flip at most.
    assert abs(single["test_top1_percent"] - reused["test_top1_percent"]) <= 100 / 200
    assert reused["chosen"] == single["chosen"] == {"l2": 0.01}
