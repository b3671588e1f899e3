"""The run directory: checkpoint identity, the previous checkpoint as a fallback, torn metrics, the lock."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.training import (
    CheckpointIdentity,
    Trainer,
    checkpoint_identity,
    load_trained,
    load_trained_identity,
    read_metrics,
)


def _tiny(**changes) -> TrainConfig:
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=32, limit=96, val_size=32, test_limit=64,
        epochs=2, batch_size=16, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1,
        monitor_every=0,  # the kNN monitor is test_knn_monitor.py's (it adds fields, never rows, to metrics.jsonl)
    )
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (4 steps per epoch) whose checkpoint.prev.pt is the epoch-1 checkpoint."""
    run = tmp_path_factory.mktemp("run") / "done"
    Trainer(_tiny(), run, progress=False).fit()
    return run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_identity_names_the_checkpoint_bytes_its_step_and_whether_the_run_finished(finished_run):
    identity = checkpoint_identity(finished_run)
    assert identity == CheckpointIdentity(step=8, sha256=_sha256(finished_run / "checkpoint.pt"), total_steps=8, finished=True)
    previous = torch.load(finished_run / "checkpoint.prev.pt", weights_only=True)
    assert previous["step"] == 4
    # load_trained returns exactly the weights of the checkpoint the identity describes.
    config, network, task, same = load_trained_identity(finished_run)
    assert same == identity
    saved = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, saved["network"][name]), name
    _, network_again, _ = load_trained(finished_run)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), network_again.state_dict().values()))


def test_an_unfinished_run_and_an_old_run_without_sidecar_get_a_true_identity(tmp_path, finished_run):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("config.json", "checkpoint.prev.pt"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    # Only the epoch-1 checkpoint, under today's name, with no sidecar (a run written by older code).
    (run / "checkpoint.pt").write_bytes((finished_run / "checkpoint.prev.pt").read_bytes())
    (run / "checkpoint.prev.pt").unlink()
    identity = checkpoint_identity(run)
    assert identity == CheckpointIdentity(step=4, sha256=_sha256(run / "checkpoint.pt"), total_steps=8, finished=False)
    # A sidecar left from other bytes is never believed: its file key does not match.
    (run / "checkpoint.json").write_text((finished_run / "checkpoint.json").read_text())
    assert checkpoint_identity(run).sha256 == _sha256(run / "checkpoint.pt")


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_with_a_message(tmp_path, finished_run, capsys):
    run = tmp_path / "torn"
    run.mkdir()
    for path in finished_run.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    identity = checkpoint_identity(run)
    assert identity.step == 4 and identity.sha256 == _sha256(run / "checkpoint.prev.pt") and identity.file == "checkpoint.prev.pt"
    assert not identity.finished
    err = capsys.readouterr().err
    assert "checkpoint.pt is damaged" in err and "using checkpoint.prev.pt (step 4)" in err
    # Resuming continues from the previous checkpoint and finishes the run.
    trainer = Trainer(_tiny(), run, resume=True, progress=False)
    assert trainer.step == 4
    assert trainer.fit()["steps"] == 8
    assert checkpoint_identity(run).step == 8
    (run / "checkpoint.pt").write_bytes(b"garbage")
    (run / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(PretextlabError, match=r"checkpoint.pt is damaged.*checkpoint.prev.pt is damaged.*no loadable previous"):
        checkpoint_identity(run)


def _copy_run(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_a_torn_metrics_tail_and_orphan_temporary_files_do_not_stop_a_resume(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path / "torn-metrics")
    # The state of a run killed mid-epoch 2: the epoch-1 checkpoint, a torn last metrics line (the
    # disk filled mid-append) and a temporary file from a kill during a checkpoint save.
    (run / "checkpoint.pt").write_bytes((finished_run / "checkpoint.prev.pt").read_bytes())
    (run / "checkpoint.json").unlink()
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"st')
    (run / ".checkpoint.pt.k2x9.tmp").write_bytes(b"\0" * 100)
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [8]  # the torn line is skipped on reading
    Trainer(_tiny(), run, resume=True, progress=False).fit()
    assert not list(run.glob(".*.tmp"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses again
    # Each record once: validation at steps 4 and 8, the training window logged at the last step.
    assert [(m["step"], "loss" in m) for m in records] == [(4, False), (8, True), (8, False)]
    assert all(m["val_pretext_accuracy_percent"] is not None for m in records if "loss" not in m)
    # A damaged line that is not the last one is not guessed at: one clear error naming the line.
    (run / "metrics.jsonl").write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    with pytest.raises(PretextlabError, match=r"metrics.jsonl line 2 is not JSON"):
        read_metrics(run)


def test_learning_rate_at_the_edges_of_the_schedule():
    from pretextlab.training import learning_rate

    config = TrainConfig(base_lr=0.1, batch_size=128, warmup_epochs=0.5, decay_epochs=(2.0, 3.0), decay_factor=0.1, epochs=4)
    peak1, peak2 = 0.1 * 128 / 256, 0.1 * 256 / 256
    # Warm-up of 5 steps: step s trains at (s + 1) / 5 of the peak, reaching it at the last warm-up step.
    assert [learning_rate(config, s, 10) for s in range(6)] == pytest.approx([peak1 * f for f in (0.2, 0.4, 0.6, 0.8, 1.0, 1.0)])
    assert learning_rate(config, 19, 10) == pytest.approx(peak1)
    assert learning_rate(config, 20, 10) == pytest.approx(peak1 * 0.1)
    assert learning_rate(config, 39, 10) == pytest.approx(peak1 * 0.01)  # the last step of 4 epochs
    # Two processes: half the steps per epoch, twice the global batch, the same warm-up in epochs.
    assert [learning_rate(config, s, 5, world_size=2) for s in range(4)] == pytest.approx(
        [peak2 * f for f in (0.4, 0.8, 1.0, 1.0)]
    )
    # No warm-up: the peak from step 0.
    no_warmup = TrainConfig(base_lr=0.1, batch_size=128, warmup_epochs=0.0, decay_epochs=(2.0,), decay_factor=0.1)
    assert learning_rate(no_warmup, 0, 10) == pytest.approx(peak1)
    # Warm-up shorter than one step (0.05 epochs of 2 steps): never above the peak (was 10x it).
    short = TrainConfig(base_lr=0.1, batch_size=128, warmup_epochs=0.05, decay_epochs=(2.0,), decay_factor=0.1)
    for world_size, steps in ((1, 2), (2, 1)):
        peak = 0.1 * 128 * world_size / 256
        assert learning_rate(short, 0, steps, world_size) == pytest.approx(peak)
        assert max(learning_rate(short, s, steps, world_size) for s in range(4 * steps)) == pytest.approx(peak)


class _NotWeights:
    """An arbitrary pickled object: unpickling it could run any code, so weights_only loading refuses it."""


def test_a_checkpoint_with_arbitrary_objects_is_refused_not_unpickled(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path / "pickled")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "extra": _NotWeights()}, run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink()
    with pytest.raises(PretextlabError, match=r"checkpoint.pt is damaged \(UnpicklingError.*no loadable previous"):
        load_trained(run)


def test_an_atomic_write_syncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    import os
    import stat

    from pretextlab import atomic

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):  # the OS boundary: record what kind of object each fsync was for
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    atomic.write_json(tmp_path / "x.json", {"a": 1})
    assert synced == ["file", "dir"]  # the data first, then the rename's directory entry
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_config_json_records_its_format_version_and_a_newer_one_is_refused(tmp_path, finished_run, capsys):
    from pretextlab.cli import main
    from pretextlab.training import RUN_FORMAT_VERSION, load_config

    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["format_version"] == RUN_FORMAT_VERSION and saved["world_size"] == 1
    # A run written before versions existed (config.json of only config + hash) still loads and resumes.
    old = _copy_run(finished_run, tmp_path / "unversioned")
    (old / "config.json").write_text(json.dumps({"config": load_config(finished_run).to_dict(), "hash": saved["hash"]}))
    (old / "checkpoint.pt").write_bytes((finished_run / "checkpoint.prev.pt").read_bytes())
    for name in ("checkpoint.json", "checkpoint.prev.pt", "checkpoint.prev.json", "summary.json"):
        (old / name).unlink()
    assert load_config(old) == load_config(finished_run)
    assert Trainer(_tiny(), old, resume=True, progress=False).fit()["steps"] == 8
    # A run from a newer pretextlab is refused with one line, for training and for evaluation.
    newer = _copy_run(finished_run, tmp_path / "newer")
    (newer / "config.json").write_text(json.dumps({**saved, "format_version": RUN_FORMAT_VERSION + 1}))
    newest = RUN_FORMAT_VERSION
    with pytest.raises(PretextlabError, match=rf"run format version {newest + 1}, newer than this pretextlab reads \({newest}\): upgrade"):
        Trainer(_tiny(), newer, resume=True, progress=False)
    assert main(["evaluate", "--run", str(newer), "--device", "cpu"]) == 2
    assert "newer than this pretextlab reads" in capsys.readouterr().err


def test_run_files_are_one_table_and_checkpoints_their_own_module(tmp_path):
    # Issue 15: the run directory's paths come from one table (no property per file), and the
    # checkpoint job lives in training/checkpoint.py, which the package re-exports.
    import dataclasses

    from pretextlab.training import (
        CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, METRICS_FILE, PREVIOUS_CHECKPOINT_FILE, SUMMARY_FILE, RunFiles,
    )
    from pretextlab.training import checkpoint

    files = RunFiles(tmp_path)
    expected = {"config": CONFIG_FILE, "checkpoint": CHECKPOINT_FILE, "previous_checkpoint": PREVIOUS_CHECKPOINT_FILE,
                "metrics": METRICS_FILE, "summary": SUMMARY_FILE, "lock": LOCK_FILE}
    assert {f.name for f in dataclasses.fields(RunFiles)} == {"root", *expected}
    assert {name: getattr(files, name) for name in expected} == {name: tmp_path / f for name, f in expected.items()}
    assert files == RunFiles(tmp_path) and repr(files) == f"RunFiles(root={tmp_path!r})"
    assert checkpoint.CheckpointIdentity is CheckpointIdentity and checkpoint.checkpoint_identity is checkpoint_identity
