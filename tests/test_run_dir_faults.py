"""Faults at the run directory give one clear error (exit 2) and keep what was finished."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forked_cli import ForkedCli
from pretextlab.training import run_dir as run_dir_module
from pretextlab.cli import main
from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.training import Trainer, checkpoint_identity, read_metrics

TINY = [
    "train", "--task", "rotation", "--network", "resnet50v1", "--width", "1", "--limit", "96", "--val-size", "32",
    "--test-limit", "64", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--val-batches", "1",
    "--image-size", "16", "--no-progress",  # 16 px: what is checked here does not depend on the image size
]


def _tiny(**changes) -> TrainConfig:
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=16, limit=96, val_size=32, test_limit=64,
        epochs=1, batch_size=16, device="cpu", val_batches=1,  # = TINY, so the CLI run can be resumed here
    )
    base.update(changes)
    return TrainConfig(**base)


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretextlab: error: "), err
    return err[0]


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_an_unusable_out_is_refused_before_anything_is_created(tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    assert "--out" in _error(capsys, *TINY, "--out", str(afile)) and "is a file" in _error(capsys, *TINY, "--out", str(afile))
    assert "which is a file" in _error(capsys, *TINY, "--out", str(afile / "run"))
    assert "under /proc" in _error(capsys, *TINY, "--out", "/proc/pretextlab-run")
    # A run that cannot start (fewer images than one batch) leaves no directory behind, so the
    # corrected command is not refused as "already holds a run".
    out = tmp_path / "new" / "run"
    assert "fewer than one batch" in _error(capsys, *TINY, "--batch-size", "128", "--out", str(out))
    assert not (tmp_path / "new").exists()


def test_kernel_filesystems_are_refused_but_dev_shm_is_a_place_for_runs():
    from pretextlab.training.run_dir import check_out_dir

    for path in ("/proc/1/run", "/sys/run", "/dev/run"):
        with pytest.raises(PretextlabError, match="not a place for files"):
            check_out_dir(Path(path))
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        check_out_dir(Path("/dev/shm/pretextlab-run"))  # a tmpfs: allowed (nothing is created)
        assert not Path("/dev/shm/pretextlab-run").exists()


def test_a_read_only_filesystem_is_named(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as readonly:
        assert "read-only filesystem" in _error(capsys, *TINY, "--out", str(readonly / "run"))


@pytest.mark.parametrize("content, train_message, evaluate_message", [
    ("{not json", "cannot be read as JSON", "cannot be read as JSON"),
    ("[1, 2]", "is not a pretextlab run config", "is not a pretextlab run config"),
    ('{"config": {"width": "wide", "no_such_option": 1}}', "its config differs", "unknown training option"),
])
def test_a_damaged_config_json_is_one_clear_error(tmp_path, capsys, content, train_message, evaluate_message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(content)
    assert train_message in _error(capsys, *TINY, "--out", str(run), "--resume")
    message = _error(capsys, "evaluate", "--run", str(run), "--device", "cpu")
    assert evaluate_message in message and "config.json" in message
    assert (run / "config.json").read_text() == content  # nothing of the user's is overwritten


@pytest.mark.slow
def test_a_second_train_on_the_same_out_is_refused_with_the_first_ones_pid(tmp_path, capsys):
    # The first train is another process (forked from this one, which has torch imported); the
    # second is this one (main in process: the lock is an flock, which conflicts between open
    # files, in one process or two).
    run = tmp_path / "shared"
    first = ForkedCli([*TINY, "--epochs", "20", "--out", str(run)])
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").exists():
            assert first.poll() is None, first.stderr_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for extra in ((), ("--resume",)):
            message = _error(capsys, *TINY, "--epochs", "20", "--out", str(run), *extra)
            assert f"in use by another pretextlab train (PID {first.pid})" in message
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=60)
    # The kernel drops the lock of a killed process: the run resumes.
    resumed = Trainer(_tiny(epochs=20), run, resume=True, progress=False)
    resumed.lock.release()


def test_a_full_disk_at_a_checkpoint_is_named_and_keeps_the_last_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "disk", "size=40m") as disk:
        run = disk / "run"
        trainer = Trainer(_tiny(), run, progress=False)
        trainer.fit()
        before = checkpoint_identity(run)
        with open(disk / "filler", "wb") as filler:  # fill the disk to the last block
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * (1 << 16))
                    filler.flush()
        trainer.step += 1
        with pytest.raises(PretextlabError, match=r"checkpoint.pt at step 5: No space left on device \(ENOSPC\); "
                                                   r"the last checkpoint \(step 4\) is kept.*--resume"):
            trainer.save_checkpoint()
        assert checkpoint_identity(run) == before
        assert not list(run.glob(".*.tmp"))
        (disk / "filler").unlink()


def test_a_full_disk_while_logging_metrics_takes_back_the_partial_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(_tiny(), run, progress=False)
    trainer.fit()
    before = (run / "metrics.jsonl").read_bytes()
    real_write = os.write

    def disk_full_after_some_bytes(fd, data):
        # The one allowed stand-in: the OS write call, which writes part of the line and then fails.
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir_module.os, "write", disk_full_after_some_bytes)
    with pytest.raises(PretextlabError, match=r"metrics.jsonl at step 4: No space left on device \(ENOSPC\)"):
        trainer._log({"step": 4, "loss": 1.0})
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_validation_split_with_nothing_scored_says_so(tmp_path, capsys):
    # One held-out image: a batch of one cannot be scored (BatchNorm-free eval needs >= 2 per batch).
    summary = Trainer(_tiny(val_size=1, limit=65, epochs=1), tmp_path / "run", progress=False).fit()
    assert summary["val_pretext_accuracy_percent"] is None and summary["val_pretext_scored"] == 0
    val = [m for m in read_metrics(tmp_path / "run") if "val_pretext_accuracy_percent" in m]
    assert [m["val_pretext_accuracy_percent"] for m in val] == [None]
    assert "val pretext accuracy not scored" in capsys.readouterr().err


@pytest.mark.slow
def test_train_prints_only_its_json_summary_on_stdout(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pretextlab", *TINY, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # nothing but JSON
    assert summary["world_size"] == 1 and summary["global_batch_images"] == 16
    assert summary["val_pretext_scored"] == 64 and 0 <= summary["val_pretext_accuracy_percent"] <= 100
    assert "val pretext accuracy" in done.stderr and "only 64 scored samples" in done.stderr
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["world_size"] == 1 and saved["global_batch_images"] == 16
