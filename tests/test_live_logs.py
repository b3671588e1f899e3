"""Live logs (issue 17 item 1): TensorBoard event files mirror metrics.jsonl, a resume logs no step
twice, --wandb logs the same (offline here), and a missing wandb is one clear error."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.training import Trainer, read_metrics
from pretextlab.training.live_log import TENSORBOARD_DIR, scalar_tag, scalars

TINY = dict(task="rotation", network="resnet50v1", width=1, image_size=16, limit=96, val_size=32, test_limit=32,
            epochs=2, batch_size=16, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1, log_every=1)
BLOCK = 32768  # the .wandb log format's block size (LevelDB's log format, which wandb's datastore follows)


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    # The event file stores each scalar as float32: the metrics' float64 values rounded once, compared exactly.
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        for name, value in scalars(record).items():
            expected.setdefault(scalar_tag(name), []).append((record["step"], float(np.float32(value))))
    return expected


@pytest.mark.slow  # two sessions of a tiny run: ~5 s on 2 quiet cores
def test_tensorboard_holds_the_metrics_and_a_resume_logs_no_step_twice(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(**TINY), run, progress=False).fit()
    logged = _tensorboard(run)
    assert logged == _expected(run)
    assert {"train/loss", "train/lr", "train/pretext_accuracy_percent", "train/images_per_s", "train/data_wait_percent",
            "val/val_pretext_accuracy_percent", "knn/knn_pre_logits_k20_top1_percent",
            "knn/knn_pre_logits_k200_top1_percent"} <= set(logged)
    assert [step for step, _ in logged["train/loss"]] == list(range(1, 9))  # 4 steps an epoch, logged each step
    assert "epoch 1.00: val pretext accuracy" in (err := capsys.readouterr().err) and "; kNN top-1 (k=20) pre_logits " in err

    # A kill that damaged the last checkpoint (step 8): the resume falls back to the one before (step 4),
    # metrics.jsonl drops the lines after it, and TensorBoard's files drop the same steps (purge_step).
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    (run / "summary.json").unlink()
    Trainer(TrainConfig(**TINY), run, resume=True, progress=False).fit()
    assert len(list((run / TENSORBOARD_DIR).iterdir())) == 2  # one event file per session
    resumed = _tensorboard(run)
    assert resumed == _expected(run)
    assert [step for step, _ in resumed["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in resumed["knn/knn_pre_logits_k20_top1_percent"]] == [4, 8]


def _wandb_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points from an offline run's .wandb file. wandb 0.31 ships no reader, so
    this walks its log format: a 7-byte file header, then in 32 KiB blocks records of crc32, length (2
    bytes, little-endian) and type (1 byte) before a wandb_internal Record protobuf (a tiny run's records
    are whole, never split across blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, position, history = path.read_bytes(), 7, {}
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, _ = struct.unpack("<IHB", data[position : position + 7])
        record = wandb_internal_pb2.Record.FromString(data[position + 7 : position + 7 + length])
        position += 7 + length
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for tag, value in items.items():
                if not tag.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    history.setdefault(tag, []).append((items["_step"], float(value)))
    return history


def _settled_wandb_history(folder: Path, expected: dict, timeout: float = 60.0) -> dict[str, list[tuple[int, float]]]:
    """The offline run's history once it equals ``expected`` (else as it is after ``timeout``).
    wandb's service process writes the file: on a loaded machine it was still writing the last
    records when finish() returned (the file read empty, or without step 4), and a record read
    half-written does not decode."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            (offline,) = folder.glob("offline-run-*/*.wandb")
            history = _wandb_history(offline)
        except Exception:
            if time.monotonic() > deadline:
                raise
        else:
            if history == expected or time.monotonic() > deadline:
                return history
        time.sleep(0.1)


@pytest.mark.slow  # wandb starts its service process: ~5 s
def test_wandb_offline_logs_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    Trainer(TrainConfig(**{**TINY, "epochs": 1}, wandb="pretextlab-test"), run, progress=False).fit()
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        for name, value in scalars(record).items():
            expected.setdefault(scalar_tag(name), []).append((record["step"], value))
    assert "knn/knn_pre_logits_k20_top1_percent" in expected and len(expected["train/loss"]) == 4
    assert _settled_wandb_history(tmp_path / "wandb-dir" / "wandb", expected) == expected  # JSON carries the float64 values whole: exact
    assert not (run / "wandb").exists()  # WANDB_DIR is respected


def test_without_wandb_the_flag_is_one_clear_error_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(PretextlabError, match=r"--wandb proj: the wandb package is not installed: pip install pretextlab\[wandb\]"):
        Trainer(TrainConfig(**TINY, wandb="proj"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
