"""The feature cache's files: their lock, record, reserved space and checksums.

Nothing damaged is used: when an output is complete its file size and a CRC-32 per block of rows
(of its features and of the labels) are recorded, and checked on every reuse; a missing,
truncated, zero-byte, garbage or altered file is rebuilt with a message on stderr. The file's
space is reserved up front (``posix_fallocate``), so a full disk fails at once with an error that
names the path and the bytes needed, instead of a SIGBUS in the middle of writing a memmap. One
lock per cache folder serialises processes sharing it: a second one waits, then reuses what the
first made and adds only what is still missing, so neither overwrites the other's record. An
output's record names the ranks that extracted it (``ranks``, written by ``sharded_features``;
absent: one process).

Features are stored as float32, or in half the bytes as float16 or bfloat16 (``FEATURE_DTYPES``;
numpy has no bfloat16, so its files hold the uint16 bit patterns and ``Bfloat16Rows`` reads them
back as float32, exactly). Probes always compute in float32 on what they read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pretextlab.errors import PretextlabError

META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
LOCK_FILE = ".lock"
CACHE_VERSION = 2  # 2: per-output checksums; a version-1 cache is rebuilt
CHECKSUM_BLOCK_BYTES = 1 << 24  # rows are checksummed in blocks of about 16 MiB
FEATURE_DTYPES = ("float32", "bfloat16", "float16")
_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}


def storage_dtype(feature_dtype: str) -> type:
    """The numpy dtype a cache file of ``feature_dtype`` features holds."""
    if feature_dtype not in _STORAGE:
        raise PretextlabError(f"unknown --feature-dtype {feature_dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}")
    return _STORAGE[feature_dtype]


class Bfloat16Rows:
    """A read-only (N, D) array of bfloat16 values kept as uint16 bit patterns (a memmap), read as
    float32: a row slice stays lazy (like a memmap's), any other index decodes its rows."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, index: Any) -> "Bfloat16Rows | np.ndarray":
        if isinstance(index, slice):
            return Bfloat16Rows(self.bits[index])
        # bfloat16 is the top half of a float32: shifting its bits back up is exact.
        return (np.asarray(self.bits[index]).astype(np.uint32) << 16).view(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[np.arange(len(self))]
        return values if dtype is None else values.astype(dtype, copy=False)


def say(message: str) -> None:
    # People read stderr; stdout is kept for the commands' JSON.
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


@contextmanager
def cache_lock(split_dir: Path) -> Iterator[None]:
    """Hold the folder's lock: a second process on the same cache waits here (and says so)."""
    with open(split_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process extracting features into {split_dir}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_meta(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        say(f"the feature cache record {path} is unreadable ({error}): rebuilding that cache")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("outputs"), dict) or meta.get("version") != CACHE_VERSION:
        say(f"the feature cache record {path} is from another version or malformed: rebuilding that cache")
        return None
    return meta


def check_meta(meta: dict[str, Any], split_dir: Path, num_images: int, labels_sha: str, budget: int, feature_dtype: str = "float32") -> None:
    expected = {"version": CACHE_VERSION, "num_images": num_images, "labels_sha": labels_sha, "budget": budget, "feature_dtype": feature_dtype}
    # A record written before --feature-dtype holds float32 features.
    found = {key: meta.get(key, "float32" if key == "feature_dtype" else None) for key in expected}
    if found != expected:
        differences = ", ".join(f"{k}: cached {found[k]!r} vs now {expected[k]!r}" for k in expected if found[k] != expected[k])
        raise PretextlabError(
            f"the feature cache in {split_dir} was made for other images or settings ({differences}): "
            "use a different preprocessing key, or delete that folder to rebuild it"
        )


def open_store(path: Path, shape: tuple[int, ...], dtype: type) -> np.memmap | None:
    """An existing .npy of exactly this shape and dtype, opened for writing in place; else None."""
    if not path.exists():
        return None
    try:
        store = np.load(path, mmap_mode="r+")
    except (OSError, ValueError, EOFError):
        return None
    return store if store.shape == shape and store.dtype == dtype else None


def create_store(path: Path, shape: tuple[int, ...], dtype: type) -> np.memmap:
    """A new .npy memmap whose blocks are reserved now: a full disk is an error here, not a SIGBUS later."""
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        store = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a filesystem that cannot reserve
                    raise
    except OSError as error:
        path.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = os.statvfs(path.parent)
            raise PretextlabError(
                f"no space left for the feature cache {path}: it needs {_size(needed)} ({needed} bytes), "
                f"{_size(free.f_bavail * free.f_frsize)} are free: free some space (or lower --limit) and run it again"
            ) from error
        raise PretextlabError(f"cannot create the feature cache {path} ({error})") from error
    return store


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _block_rows(dim: int, itemsize: int) -> int:
    return max(1, CHECKSUM_BLOCK_BYTES // (itemsize * max(1, dim)))


def _checksums(array: np.ndarray, rows: int, block: int) -> list[int]:
    return [zlib.crc32(np.ascontiguousarray(array[start : min(start + block, rows)]).data) for start in range(0, rows, block)]


def integrity(split_dir: Path, output: str, rows: int, dim: int) -> dict[str, Any]:
    """What a complete output's files must still be on reuse: sizes and per-block CRC-32s."""
    path = split_dir / f"{output}.npy"
    features = np.load(path, mmap_mode="r")
    labels = np.load(split_dir / LABELS_FILE, mmap_mode="r")
    block = _block_rows(dim, features.dtype.itemsize)
    return {
        "bytes": path.stat().st_size,
        "block_rows": block,
        "crc32": _checksums(features, rows, block),
        "labels_crc32": zlib.crc32(np.ascontiguousarray(labels[:rows]).data),
    }


def damage(split_dir: Path, output: str, state: dict[str, Any], num_images: int, feature_dtype: str = "float32") -> str | None:
    """Why a complete output's cache cannot be reused (None: it is intact)."""
    path = split_dir / f"{output}.npy"
    record = state.get("integrity")
    if not isinstance(record, dict):
        return "no checksum was recorded"
    if not path.exists():
        return f"{path.name} is missing"
    if path.stat().st_size != record.get("bytes"):
        return f"{path.name} has {path.stat().st_size} bytes, {record.get('bytes')} were written"
    rows, dim = int(state["rows_done"]), int(state["dim"])
    features = open_store(path, (num_images, dim), storage_dtype(feature_dtype))
    labels = open_store(split_dir / LABELS_FILE, (num_images,), np.int64)
    if features is None or labels is None:
        return f"{path.name if features is None else LABELS_FILE} is unreadable or has the wrong shape"
    block = int(record["block_rows"])
    for index, (found, kept) in enumerate(zip(_checksums(features, rows, block), record["crc32"])):
        if found != kept:
            return f"rows {index * block}..{min((index + 1) * block, rows) - 1} of {path.name} changed after they were written"
    if zlib.crc32(np.ascontiguousarray(labels[:rows]).data) != record.get("labels_crc32"):
        return f"{LABELS_FILE} changed after it was written"
    return None
