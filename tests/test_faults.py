"""Faults lose nothing: SIGKILL and SIGTERM mid-epoch, a NaN, a failed checkpoint write, bad images."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from forked_cli import ForkedCli
from pretextlab.config import TrainConfig, resolve
from pretextlab.errors import PretextlabError
from pretextlab.training import Trainer, read_metrics
from pretextlab.training.run_dir import RunFiles, check_resumable, config_record

# 44 steps: room for three stops, each a few steps after the resume before it, and for a busy
# machine to let a run go on a while before the test process sends its signal. 16-pixel images make
# a step half as long as 32-pixel ones, so 44 of them leave the same time after the last stop as 28
# did; the kNN monitor is off: what is checked is the resume, not the monitor.
TINY = [
    "--task", "rotation", "--network", "resnet50v1", "--width", "1", "--limit", "736", "--val-size", "32",
    "--test-limit", "64", "--epochs", "1", "--batch-size", "16", "--crop-scale", "0.6", "1.0", "--image-size", "16",
    "--color-jitter", "0", "--device", "cpu", "--val-batches", "1", "--monitor-every", "0", "--no-progress",
]


def _train_cli(out: Path, *extra: str) -> ForkedCli:
    # A real process (it is sent real signals) forked from this one, which has torch imported; it
    # gets Python's own Ctrl-C handling and one intra-op thread whatever pytest was started with,
    # so the uninterrupted run and the stopped ones compute alike, bit for bit.
    return ForkedCli(["train", *TINY, "--out", str(out), *extra])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The network's and the task head's weights (exact resume must restore both)."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return {f"{part}.{name}": value for part in ("network", "task") for name, value in state[part].items()}


def _wait_for(condition, process: ForkedCli, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the fault was injected: {process.stderr_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run to make progress")
        time.sleep(0.05)


def _checkpoint_step(run: Path) -> int:
    """The step of the last complete checkpoint, from its sidecar (written once checkpoint.pt is whole)."""
    try:
        return json.loads((run / "checkpoint.json").read_text())["step"]
    except FileNotFoundError:
        return 0


def _logged_steps(run: Path) -> int:
    return max((m["step"] for m in read_metrics(run) if "loss" in m), default=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "whole"
    done = _train_cli(run, "--log-every", "1")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    return run


@pytest.mark.slow
def test_sigterm_then_sigint_then_sigkill_and_each_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    """One run stopped three ways in turn, resumed after each: every resume continues exactly, so
    the weights at the end are bit-identical to the uninterrupted run's (a resume that lost or
    replayed anything would show there), and every step is logged once across the three stops."""
    run = tmp_path / "stopped"
    total = json.loads((uninterrupted / "summary.json").read_text())["steps"]
    flags = ("--checkpoint-every", "3", "--log-every", "1")

    # SIGTERM (a preempted job): a checkpoint after the current step, exit 143.
    process = _train_cli(run, *flags)
    _wait_for(lambda: _logged_steps(run) >= 4, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    terminated_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 4 <= terminated_at < total
    stopped = [m for m in read_metrics(run) if m.get("event") == "stopped by SIGTERM"]
    assert [m["step"] for m in stopped] == [terminated_at]

    # SIGINT (Ctrl-C): exit 130, the last checkpoint kept, no traceback, no temporary file. Sent
    # just after a periodic checkpoint is complete (its sidecar is written last), three steps
    # before the next: a Ctrl-C inside torch.save is a separate fault, not this test's.
    process = _train_cli(run, *flags, "--resume")
    _wait_for(lambda: _checkpoint_step(run) > terminated_at, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted; finished work is kept" in err and "Traceback" not in err
    interrupted_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert terminated_at < interrupted_at < total  # a periodic checkpoint made after the resume
    assert not list(run.glob(".*.tmp"))

    # SIGKILL (a node failure): only the last mid-epoch checkpoint is left.
    process = _train_cli(run, *flags, "--resume")
    _wait_for(lambda: _logged_steps(run) >= interrupted_at + 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert interrupted_at < killed_at < total and killed_at % 3 == 0

    resumed = _train_cli(run, *flags, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["steps"] == total
    expected, got = _weights(uninterrupted), _weights(run)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, total + 1))  # every step logged exactly once across the stops


def _tiny_config(**changes) -> TrainConfig:
    """4 steps an epoch, 2 epochs; no kNN monitor (no test here checks it)."""
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=16, limit=96, val_size=32, test_limit=64,
        epochs=2, batch_size=16, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1, monitor_every=0,
    )
    base.update(changes)
    return TrainConfig(**base)


class _PoisonedTrainer(Trainer):
    """Plants a NaN in the first convolution's weights just before step ``poison_at``."""

    poison_at = 6  # in epoch 2, after epoch 1's checkpoint at step 4

    def train_step(self, images):
        if self.step == self.poison_at:
            with torch.no_grad():
                next(p for p in self.network.parameters() if p.ndim == 4).view(-1)[0] = float("nan")
        return super().train_step(images)


@pytest.mark.slow
def test_a_planted_nan_stops_cleanly_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    trainer = _PoisonedTrainer(_tiny_config(), run, progress=False)
    with pytest.raises(PretextlabError, match=r"at step 6: the run stopped and its last good checkpoint"):
        trainer.fit()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4  # the end of epoch 1 (4 steps per epoch), before the NaN
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()
    # The good checkpoint resumes (the NaN was planted, not learned) and the run finishes.
    assert Trainer(_tiny_config(), run, resume=True, progress=False).fit()["steps"] == 8


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    run = tmp_path / "full-disk"
    trainer = Trainer(_tiny_config(epochs=1), run, progress=False)
    trainer.fit()
    before = (run / "checkpoint.pt").read_bytes()

    def disk_full(obj, handle, *args, **kwargs):
        # A real partial write first, then the error a full disk gives.
        handle.write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # what atomic.save_torch calls
    trainer.step += 1
    with pytest.raises(PretextlabError, match=r"checkpoint.pt at step 5: No space left on device \(ENOSPC\); the last checkpoint \(step 4\) is kept"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (run / "checkpoint.pt").read_bytes() == before
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_resuming_with_a_changed_config_is_refused_unless_forced(tmp_path):
    run = tmp_path / "changed"
    Trainer(_tiny_config(epochs=1), run, progress=False).fit()
    with pytest.raises(PretextlabError, match=r"config differs.*base_lr: 0\.1 -> 0\.2.*--force"):
        Trainer(_tiny_config(epochs=1, base_lr=0.2), run, resume=True, progress=False)
    with pytest.warns(UserWarning, match="changed config"):
        Trainer(_tiny_config(epochs=1, base_lr=0.2), run, resume=True, force=True, progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert saved["optimisation"]["base_lr"] == 0.2
    assert any("base_lr" in d for change in saved["forced_changes"] for d in change)
    # Another number of processes is another recipe (global batch, the lr scaled by it, steps per
    # epoch): refused like any change, naming both and how to launch it as before; --force records it.
    resumed = resolve(_tiny_config(epochs=1, base_lr=0.2))  # as the Trainer resolves it
    with pytest.raises(PretextlabError, match=r"processes: 1 -> 2 \(global batch 16 -> 32 images\); launch it on 1 process"):
        check_resumable(RunFiles(run), config_record(resumed, world_size=2), resume=True, force=False)
    assert check_resumable(RunFiles(run), config_record(resumed, world_size=1), resume=True, force=False)["world_size"] == 1
    with pytest.warns(UserWarning, match="processes: 1 -> 2"):
        forced = check_resumable(RunFiles(run), config_record(resumed, world_size=2), resume=True, force=True)
    assert any("processes: 1 -> 2" in d for d in forced["forced_changes"][-1])


def _write_folder_dataset(root: Path) -> dict[str, int]:
    """Two classes of real images in every mode a crawl meets, plus files that cannot be decoded."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, name in enumerate(("circles", "stripes")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[:, ::4] = 255 * label
                image = Image.fromarray(pixels)
                kind = i % 4
                if kind == 0:
                    image.save(folder / f"{i}.jpg")
                elif kind == 1:
                    image.convert("CMYK").save(folder / f"{i}.jpg")
                elif kind == 2:
                    image.convert("P").save(folder / f"{i}.png")
                else:
                    sixteen = (pixels[..., 0].astype(np.uint16) * 257)
                    Image.fromarray(sixteen).save(folder / f"{i}.png")  # mode I;16
    bad = root / "train" / "circles"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "not-an-image.png").write_text("this is a text file with an image extension")
    good = (bad / "0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return {"bad_train_files": 3}


@pytest.mark.slow
def test_a_folder_of_odd_and_broken_images_trains_and_reports_what_it_skipped(tmp_path):
    data = tmp_path / "data"
    expected = _write_folder_dataset(data)
    run = tmp_path / "odd"
    # A forked run: its own stderr, where the loader's warnings (from its worker processes too) land.
    done = ForkedCli(
        ["train", "--task", "rotation", "--network", "resnet50v1", "--width", "1",
         "--dataset", "folder", "--data-dir", str(data), "--image-size", "32", "--val-size", "4", "--epochs", "1",
         "--batch-size", "8", "--device", "cpu", "--out", str(run), "--no-progress"],
    )
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    summary = json.loads((run / "summary.json").read_text())
    # Each unreadable file is skipped wherever it landed (train or held-out validation) and counted.
    skipped_lines = [line for line in stderr.splitlines() if "skipped unreadable image" in line]
    named = {name for name in ("zero.jpg", "not-an-image.png", "truncated.jpg") if any(name in l for l in skipped_lines)}
    assert named == {"zero.jpg", "not-an-image.png", "truncated.jpg"}
    assert summary["skipped_images"] + summary["skipped_val_images"] == expected["bad_train_files"]
    assert summary["steps"] >= 2
