"""Multi-process training on CPU (gloo): same weights everywhere, same curve as one process, and a
run whose ranks die resumes. The ranks are children forked from this process with torchrun's
environment (tests/forked_ranks.py), running the same worker scripts torchrun would; a real torchrun
launch is tested in tests/test_lbfgs_distributed.py and tests/test_slurm.py."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

import pretextlab.cli  # noqa: F401  (imported before the forks: the ranks inherit it)
from forked_ranks import finish, forked_ranks, script, stop
from pretextlab.config import TrainConfig
from pretextlab.training import Trainer, read_metrics

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"
CLI_WORKER = Path(__file__).parent / "workers" / "ddp_cli.py"


def _config(**changes) -> TrainConfig:
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=32, limit=288, val_size=32, test_limit=64,
        epochs=1, batch_size=32, crop_scale=(1.0, 1.0), color_jitter=0.0, flip=False, device="cpu", val_batches=1,
        log_every=1,
        base_lr=0.1,
        monitor_every=0,  # the kNN monitor is not under test here
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.slow
def test_two_processes_keep_identical_weights_and_follow_the_one_process_run(tmp_path):
    # Two ranks of 16 images each against one process of 32: the same global batch of the same images,
    # whole unflipped views, BatchNorm over the global batch (--sync-bn). In float64, because float32
    # roundoff alone (e.g. channels_last on or off) moves a ResNet's first steps by tens of percent.
    # The two ranks run `pretextlab train` through cli.main as under torchrun: only rank 0 prints its JSON.
    # Two steps: the second already runs on weights and SGD momentum that the first step's all-reduce made.
    changes = dict(sync_bn=True, precision="fp64", epochs=0.25)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    ranks = forked_ranks(script(CLI_WORKER), argv=[
        str(dumps), "train", "--task", "rotation", "--network", "resnet50v1", "--width", "1",
        "--image-size", "32", "--limit", "288", "--val-size", "32", "--test-limit", "64", "--epochs", "0.25",
        "--batch-size", "16", "--crop-scale", "1.0", "1.0", "--color-jitter", "0", "--no-flip", "--device", "cpu",
        "--val-batches", "1", "--log-every", "1", "--base-lr", "0.1", "--sync-bn", "--precision", "fp64",
        "--monitor-every", "0", "--no-progress", "--out", str(tmp_path / "two")])
    (out0, err0), (out1, err1) = finish(ranks)
    assert [rank.returncode for rank in ranks] == [0, 0], (err0[-3000:], err1[-3000:])
    assert out1 == ""  # rank 1 printed nothing
    summary = json.loads(out0)  # one JSON document
    assert summary["world_size"] == 2 and summary["global_batch_images"] == 32 and summary["steps"] == 2
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
    assert [m["step"] for m in curve_two] == [m["step"] for m in curve_one] == [1, 2]
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
def test_a_dead_rank_ends_the_other_and_the_two_process_run_resumes_and_finishes(tmp_path):
    """A rank killed mid-run (SIGKILL, as the OOM killer or a lost node would) makes the other rank
    fail in its next collective instead of hanging; both ranks launched again resume from the last
    checkpoint and finish, each step logged once, the ranks' weights identical.

    (Under torchrun this test once killed the launcher's process group, but torchrun starts each
    rank in a session of its own: the "killed" ranks ran on and finished the run themselves.)"""
    run = tmp_path / "ddp"
    config = _config(batch_size=8, checkpoint_every=2, epochs=1, limit=160)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    argv = [json.dumps(config.to_dict()), str(run), str(dumps)]  # tests/workers/ddp_train.py's
    ranks = forked_ranks(script(WORKER), argv=argv)
    try:
        deadline = time.monotonic() + 180  # a guard against a hang, not a measurement
        while not (run / "checkpoint.pt").exists():
            assert all(rank.poll() is None for rank in ranks), [rank.stderr_text()[-3000:] for rank in ranks]
            assert time.monotonic() < deadline, "the run never checkpointed"
            time.sleep(0.05)
        ranks[1].kill()
        # Rank 0 learns of it from gloo (the peer's connection closed) and exits with an error.
        assert ranks[0].wait(timeout=180) not in (0, None), ranks[0].stderr_text()[-3000:]
        assert ranks[1].wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(ranks)
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    total = 8  # 128 training images / (2 ranks x 8)
    assert 2 <= killed_at < total
    ranks = forked_ranks(script(WORKER), argv=argv)
    errors = [err for _, err in finish(ranks)]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-3000:] for err in errors]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, total + 1))
    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt") for r in (0, 1))
    # Without --sync-bn BatchNorm's running statistics are each rank's own (DDP hands rank 0's to
    # the others before each forward, then each adds its own half-batch), so they differ by design;
    # everything else is the same on both ranks, to the bit.
    per_rank = {name for name in rank0 if name.endswith(("running_mean", "running_var"))}
    assert per_rank and any(not torch.equal(rank1[name], rank0[name]) for name in per_rank)
    for name in rank0.keys() - per_rank:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
