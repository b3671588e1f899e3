"""The run directory: checkpoint identity, the previous checkpoint as a fallback, torn metrics, the lock."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.train import (
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
