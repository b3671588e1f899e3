"""Multi-process training under torchrun on CPU (gloo): same weights everywhere, same curve as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretextlab.config import TrainConfig
from pretextlab.training import Trainer, read_metrics

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"
CLI_WORKER = Path(__file__).parent / "workers" / "ddp_cli.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(**changes) -> TrainConfig:
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=32, limit=288, val_size=32, test_limit=64,
        epochs=1, batch_size=32, crop_scale=(1.0, 1.0), color_jitter=0.0, flip=False, device="cpu", val_batches=1,
        log_every=1,
        base_lr=0.1,
    )
    base.update(changes)
    return TrainConfig(**base)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


@pytest.mark.slow
def test_two_processes_keep_identical_weights_and_follow_the_one_process_run(tmp_path):
    # Two ranks of 16 images each against one process of 32: the same global batch of the same images,
    # whole unflipped views, BatchNorm over the global batch (--sync-bn). In float64, because float32
    # roundoff alone (e.g. channels_last on or off) moves a ResNet's first steps by tens of percent.
    # The two ranks run `pretextlab train` as people do under torchrun: only rank 0 prints its JSON.
    changes = dict(sync_bn=True, precision="fp64", epochs=0.5)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    done = subprocess.run(
        _torchrun(str(CLI_WORKER), str(dumps), "train", "--task", "rotation", "--network", "resnet50v1", "--width", "1",
                  "--image-size", "32", "--limit", "288", "--val-size", "32", "--test-limit", "64", "--epochs", "0.5",
                  "--batch-size", "16", "--crop-scale", "1.0", "1.0", "--color-jitter", "0", "--no-flip", "--device", "cpu",
                  "--val-batches", "1", "--log-every", "1", "--base-lr", "0.1", "--sync-bn", "--precision", "fp64",
                  "--no-progress", "--out", str(tmp_path / "two")),
        capture_output=True, text=True, env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    assert summary["world_size"] == 2 and summary["global_batch_images"] == 32 and summary["steps"] == 4
    recorded = json.loads((tmp_path / "two" / "config.json").read_text())
    assert recorded["world_size"] == 2 and recorded["global_batch_images"] == 32
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
    saved = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["network"]
    for name in rank0:
        torch.testing.assert_close(saved[name], rank0[name], rtol=0, atol=0, msg=name)

    one = Trainer(_config(batch_size=32, **changes), tmp_path / "one", progress=False)
    initial = {k: v.clone() for k, v in one.network.state_dict().items()}
    one.fit()
    curve_one = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    curve_two = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    # Rank 0 alone writes: each step appears once, at the learning rate of the global batch.
    assert [m["step"] for m in curve_two] == [m["step"] for m in curve_one] == [1, 2, 3, 4]
    assert [m["lr"] for m in curve_two] == pytest.approx([m["lr"] for m in curve_one])
    losses_one = torch.tensor([m["loss"] for m in curve_one], dtype=torch.float64)
    losses_two = torch.tensor([m["loss"] for m in curve_two], dtype=torch.float64)
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-9, atol=1e-9)
    # The weights moved the same way: the gap between the runs is roundoff next to how far they moved.
    final = one.network.state_dict()
    floats = [k for k, v in final.items() if v.is_floating_point()]
    moved = torch.cat([(final[k] - initial[k]).flatten() for k in floats]).norm()
    gap = torch.cat([(final[k] - rank0[k]).flatten() for k in floats]).norm()
    assert gap < 1e-8 * moved, (gap, moved)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_and_finishes(tmp_path):
    run = tmp_path / "ddp"
    config = _config(batch_size=8, checkpoint_every=2, epochs=1)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    command = _torchrun(str(WORKER), json.dumps(config.to_dict()), str(run), str(dumps))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoint.pt").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, as a node failure would
    process.wait()
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    total = 16  # 256 training images / (2 ranks x 8)
    assert 2 <= killed_at < total
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, total + 1))
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
