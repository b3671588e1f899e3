"""The feature cache never serves damaged values, survives a full disk with a clear error, and is
shared safely by two processes (issue 14, items 4 and 6)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from forked_cli import ForkedProcess
from pretextlab.data import load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.features import extract_features

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class TinyNetwork(nn.Module):
    """Two named outputs, deterministic (fixed weights), cheap: the cache is under test, not a network."""

    output_names = ("conv", "vector")

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        conv = torch.relu(self.conv(x))
        return {"conv": conv, "vector": conv.mean(dim=(2, 3))}


def _views(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    return images.float() / 255.0, 1


@pytest.fixture(scope="module")
def images():
    return load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=16, limit=120, test_limit=20, download=False).train


def _extract(images, cache: Path, outputs=("conv", "vector")):
    return extract_features(TinyNetwork(), _views, images, outputs, cache_dir=cache, split="train",
                            preprocessing_key="key", batch_size=32, progress=False)


def _damage_kinds():
    def rows_set_huge(path: Path) -> None:  # the case: finite but absurd values, same size
        array = np.load(path, mmap_mode="r+")
        array[5:9] = 1e30 if array.dtype.kind == "f" else 7
        array.flush()

    def truncated(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return {
        "rows set to 1e30": rows_set_huge,
        "truncated": truncated,
        "zero bytes": lambda path: path.write_bytes(b""),
        "garbage": lambda path: path.write_bytes(os.urandom(path.stat().st_size)),
        "missing": lambda path: path.unlink(),
    }


@pytest.mark.parametrize("kind", list(_damage_kinds()))
@pytest.mark.parametrize("victim", ["vector.npy", "labels.npy"])
def test_a_damaged_cache_file_is_rebuilt_with_a_message(images, tmp_path, capfd, kind, victim):
    reference = {k: np.array(v.features) for k, v in _extract(images, tmp_path / "clean").items()}
    _extract(images, tmp_path / "cache")
    _damage_kinds()[kind](tmp_path / "cache" / "key" / "train" / victim)
    capfd.readouterr()
    again = _extract(images, tmp_path / "cache")
    err = capfd.readouterr().err
    assert "damaged" in err and "rebuilding" in err, err
    for output, values in reference.items():
        np.testing.assert_array_equal(np.array(again[output].features), values)
        np.testing.assert_array_equal(again[output].labels, images.labels)
    # Rebuilt and recorded: a third call reuses it silently.
    _extract(images, tmp_path / "cache")
    assert "damaged" not in capfd.readouterr().err


def test_a_garbage_record_is_rebuilt_not_a_traceback(images, tmp_path, capfd):
    reference = np.array(_extract(images, tmp_path)["vector"].features)
    (tmp_path / "key" / "train" / "meta.json").write_text("{\"vers")
    again = _extract(images, tmp_path)
    assert "unreadable" in capfd.readouterr().err
    np.testing.assert_array_equal(np.array(again["vector"].features), reference)


def _small_tmpfs(where: Path, size: str) -> Path:
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()}): needs root")
    return where


def test_a_full_disk_fails_at_once_naming_the_path_and_the_bytes(images, tmp_path):
    disk = _small_tmpfs(tmp_path / "disk", "64k")
    try:
        # conv at 16 px: 4 x 7 x 7 = 196 floats per image, ~100 images = ~85 KB: more than the disk.
        with pytest.raises(PretextlabError) as caught:
            _extract(images, disk, outputs=("conv",))
        message = str(caught.value)
        assert "no space left" in message and "conv.npy" in message and f"({len(images) * 196 * 4} bytes)" in message
        assert not (disk / "key" / "train" / "conv.npy").exists()  # the space is given back
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: a memmap may still be open


def _extract_in_child(images, cache: Path, output: str, hold: bool) -> Callable[[], None]:
    """One process's extraction of ``output`` into the shared ``cache`` (for a forked child)."""
    def views(batch):
        if hold:  # keep the lock until the test says go: the other process must be waiting by then
            (cache / "started").touch()
            while not (cache / "go").exists():
                time.sleep(0.05)
        return _views(batch)

    def extract() -> None:
        extract_features(TinyNetwork(), views, images, (output,), cache_dir=cache, split="train",
                         preprocessing_key="key", batch_size=32, progress=False)

    return extract


def _wait_for(condition, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds  # a guard against a hang, not a measurement
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_two_processes_share_a_cache_without_losing_either_record(images, tmp_path):
    # Real processes (forked from this one: no interpreter start-up each): the cache's lock is a file lock.
    cache = tmp_path / "cache"
    cache.mkdir()
    first = ForkedProcess(_extract_in_child(images, cache, "conv", hold=True))
    second = None
    try:
        _wait_for(lambda: (cache / "started").exists() or first.poll() is not None, "the first process to start")
        second = ForkedProcess(_extract_in_child(images, cache, "vector", hold=False))
        _wait_for(lambda: second.poll() is not None or "waiting" in second.stderr_text(), "the second process to wait")
        (cache / "go").touch()
        _, first_err = first.communicate(timeout=300)
        _, second_err = second.communicate(timeout=300)
    finally:
        for child in (first, second):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    assert "waiting for another process" in second_err
    meta = json.loads((cache / "key" / "train" / "meta.json").read_text())
    assert meta["outputs"]["conv"]["complete"] and meta["outputs"]["vector"]["complete"]
    reference = _extract(images, tmp_path / "alone")
    shared = _extract(images, cache)  # both intact: reused, equal to an extraction alone
    for output in ("conv", "vector"):
        np.testing.assert_array_equal(np.array(shared[output].features), np.array(reference[output].features))
