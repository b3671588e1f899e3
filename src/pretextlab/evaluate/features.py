"""Frozen features at named outputs: pooled to the study's budget, averaged over views, cached on disk.

The study's pooling rule (PROTOCOL.md, "Evaluation of a frozen representation"): an output with
more than 9000 values per image is max-pooled with kernel = stride = ceil(sqrt(h*w*c / 9000)),
then flattened. This follows the released code's ``mode="max"`` branch of ``utils.adaptive_pool``,
which uses ``tf.contrib.layers.max_pool2d`` with its default 'VALID' padding: windows that do not
fit are dropped, i.e. ``ceil_mode=False`` here, so the result never exceeds the budget. The kernel
is clamped to the smaller spatial side, as the released code clamps it to the map size, so a
very wide 1x1-ish map still keeps one value per channel. (The released linear evaluation's
*default* was ``adaptive_max``, TF's fractional max pooling, whose windows are pseudo-random;
the deterministic rule above is the one the paper describes.)

Cache layout, one folder per (preprocessing key, split)::

    cache_dir/<preprocessing_key>/<split>/<output>.npy   float32 (N, D), written in row order
    cache_dir/<preprocessing_key>/<split>/labels.npy     int64 (N,)
    cache_dir/<preprocessing_key>/<split>/meta.json      how many batches/rows of each output are done
    cache_dir/<preprocessing_key>/<split>/.lock          held (flock) by the one process extracting

``meta.json`` is written atomically, and only after the rows it counts have been flushed, so an
interrupted extraction (Ctrl-C, a crash, a killed job) resumes from the last recorded batch and
ends bitwise identical to an uninterrupted one; a completed cache is returned without running the
network at all. The preprocessing key must change whenever the network, its weights, the views or
the images change (``probe_run`` puts the checkpoint's step and content hash in it): the cache
checks only the image count, labels and pooling budget.

Nothing damaged is used: when an output is complete its file size and a CRC-32 per block of rows
(of its features and of the labels) are recorded, and checked on every reuse; a missing,
truncated, zero-byte, garbage or altered file is rebuilt with a message on stderr. The file's
space is reserved up front (``posix_fallocate``), so a full disk fails at once with an error that
names the path and the bytes needed, instead of a SIGBUS in the middle of writing a memmap. One
lock per cache folder serialises processes sharing it: a second one waits, then reuses what the
first made and adds only what is still missing, so neither overwrites the other's record.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.data import BatchLoader, ImageSet
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError

POOL_BUDGET = 9000  # the study's cap on the number of values per image fed to a probe
META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
LOCK_FILE = ".lock"
CACHE_VERSION = 2  # 2: per-output checksums; a version-1 cache is rebuilt
CHECKSUM_BLOCK_BYTES = 1 << 24  # rows are checksummed in blocks of about 16 MiB
CHECKPOINT_SECONDS = 10.0  # how often progress is recorded during a long extraction

Views = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


@dataclass
class FeatureSet:
    """The cached features of one split at one output.

    ``features`` is float32 (N, D), normally a read-only ``np.memmap`` over ``path``, so several
    large splits never need to sit in RAM at once; index it (``features[rows]``) to load rows.
    """

    features: np.ndarray
    labels: np.ndarray  # int64 (N,)
    output: str
    split: str
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise PretextlabError(f"the pooling budget must be a whole number of values >= 1 (the study uses 9000), got {budget!r}")
    return int(budget)


def pool_size(channels: int, height: int, width: int, budget: int = POOL_BUDGET) -> int:
    """Kernel = stride of the max-pooling that brings a (C, H, W) map within ``budget``; 1 = no pooling.

    ceil(sqrt(C*H*W / budget)) computed in integers (no float rounding at exact squares), then
    clamped to the smaller spatial side so that the pooled map keeps at least one position.
    """
    budget = _check_budget(budget)
    total = channels * height * width
    if total <= budget:
        return 1
    # Smallest s with s*s >= ceil(total / budget), which is the smallest s with s*s*budget >= total.
    needed = -(-total // budget)
    size = math.isqrt(needed - 1) + 1
    return max(1, min(size, height, width))


def pooled_dim(shape: Sequence[int], budget: int = POOL_BUDGET) -> int:
    """Flattened size of one example's output after ``pool_to_budget``, without running anything.

    ``shape`` is the shape of ONE example, without the batch dimension: (C, H, W) or (D,).
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 1 for d in dims):
        raise PretextlabError(f"every dimension of shape must be >= 1, got {dims}")
    if len(dims) == 1:
        return dims[0]
    if len(dims) == 3:
        channels, height, width = dims
        size = pool_size(channels, height, width, budget)
        return channels * (height // size) * (width // size)
    raise PretextlabError(
        f"pooled_dim takes the shape of one example: (C, H, W) for a feature map or (D,) for a vector, "
        f"got {dims} (drop the batch dimension)"
    )


def pool_to_budget(x: torch.Tensor, budget: int = POOL_BUDGET) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) max-pooled to at most ``budget`` values per example (see module doc);
    (B, D) passes through unchanged."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise PretextlabError(
            f"a named output must be a (B, D) vector or a (B, C, H, W) feature map to pool, got shape {tuple(x.shape)}"
        )
    size = pool_size(x.shape[1], x.shape[2], x.shape[3], budget)
    if size > 1:
        x = F.max_pool2d(x, kernel_size=size, stride=size, ceil_mode=False)
    return x.flatten(1)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise PretextlabError(f"{what} must be a non-empty name usable as a folder name (no '/', '\\', '..'), got {value!r}")
    return value


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def _say(message: str) -> None:
    # People read stderr; stdout is kept for the commands' JSON.
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


@contextmanager
def _cache_lock(split_dir: Path) -> Iterator[None]:
    """Hold the folder's lock: a second process on the same cache waits here (and says so)."""
    with open(split_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process extracting features into {split_dir}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_meta(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _say(f"the feature cache record {path} is unreadable ({error}): rebuilding that cache")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("outputs"), dict) or meta.get("version") != CACHE_VERSION:
        _say(f"the feature cache record {path} is from another version or malformed: rebuilding that cache")
        return None
    return meta


def _check_meta(meta: dict[str, Any], split_dir: Path, images: ImageSet, labels_sha: str, budget: int) -> None:
    expected = {"version": CACHE_VERSION, "num_images": len(images), "labels_sha": labels_sha, "budget": budget}
    found = {key: meta.get(key) for key in expected}
    if found != expected:
        differences = ", ".join(f"{k}: cached {found[k]!r} vs now {expected[k]!r}" for k in expected if found[k] != expected[k])
        raise PretextlabError(
            f"the feature cache in {split_dir} was made for other images or settings ({differences}): "
            "use a different preprocessing key, or delete that folder to rebuild it"
        )


def _open_store(path: Path, shape: tuple[int, ...], dtype: type) -> np.memmap | None:
    """An existing .npy of exactly this shape and dtype, opened for writing in place; else None."""
    if not path.exists():
        return None
    try:
        store = np.load(path, mmap_mode="r+")
    except (OSError, ValueError, EOFError):
        return None
    return store if store.shape == shape and store.dtype == dtype else None


def _create_store(path: Path, shape: tuple[int, ...], dtype: type) -> np.memmap:
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


def _block_rows(dim: int) -> int:
    return max(1, CHECKSUM_BLOCK_BYTES // (4 * max(1, dim)))


def _checksums(array: np.ndarray, rows: int, block: int) -> list[int]:
    return [zlib.crc32(np.ascontiguousarray(array[start : min(start + block, rows)]).data) for start in range(0, rows, block)]


def _integrity(split_dir: Path, output: str, rows: int, dim: int) -> dict[str, Any]:
    """What a complete output's files must still be on reuse: sizes and per-block CRC-32s."""
    path = split_dir / f"{output}.npy"
    features = np.load(path, mmap_mode="r")
    labels = np.load(split_dir / LABELS_FILE, mmap_mode="r")
    block = _block_rows(dim)
    return {
        "bytes": path.stat().st_size,
        "block_rows": block,
        "crc32": _checksums(features, rows, block),
        "labels_crc32": zlib.crc32(np.ascontiguousarray(labels[:rows]).data),
    }


def _damage(split_dir: Path, output: str, state: dict[str, Any], num_images: int) -> str | None:
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
    features = _open_store(path, (num_images, dim), np.float32)
    labels = _open_store(split_dir / LABELS_FILE, (num_images,), np.int64)
    if features is None or labels is None:
        return f"{path.name if features is None else LABELS_FILE} is unreadable or has the wrong shape"
    block = int(record["block_rows"])
    for index, (found, kept) in enumerate(zip(_checksums(features, rows, block), record["crc32"])):
        if found != kept:
            return f"rows {index * block}..{min((index + 1) * block, rows) - 1} of {path.name} changed after they were written"
    if zlib.crc32(np.ascontiguousarray(labels[:rows]).data) != record.get("labels_crc32"):
        return f"{LABELS_FILE} changed after it was written"
    return None


def _complete_sets(split_dir: Path, meta: dict[str, Any], outputs: Sequence[str], split: str) -> dict[str, FeatureSet]:
    labels_all = np.load(split_dir / LABELS_FILE, mmap_mode="r")
    sets = {}
    for output in outputs:
        rows = int(meta["outputs"][output]["rows_done"])
        path = split_dir / f"{output}.npy"
        features = np.load(path, mmap_mode="r")
        sets[output] = FeatureSet(
            features=features[:rows], labels=np.array(labels_all[:rows], dtype=np.int64), output=output, split=split, path=path
        )
    return sets


def extract_features(
    network: nn.Module,
    views: Views,
    images: ImageSet,
    outputs: Sequence[str],
    cache_dir: str | Path,
    split: str,
    preprocessing_key: str,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    budget: int = POOL_BUDGET,
    workers: int = 0,
) -> dict[str, FeatureSet]:
    """Pooled, view-averaged features of every image of ``images`` at each of ``outputs``, cached.

    ``views(uint8 (B, 3, S, S) on the device) -> (float inputs (B*V, ...), V)`` with the V views of
    an image adjacent (image-major), as ``PretextTask.eval_views`` returns them. One forward pass of
    the frozen network (eval mode, no grad; bf16 autocast and channels_last on CUDA) serves every
    output still missing from the cache. Outputs already complete (and intact: see the module doc)
    are read back, not recomputed. A resumed extraction keeps the batch size it started with, so
    its batches are the same. ``network`` is moved to ``device`` (and to channels_last on CUDA);
    its train/eval mode is restored. Another process extracting into the same folder is waited for.
    """
    outputs = list(outputs)
    if not outputs:
        raise PretextlabError("no outputs asked for: name at least one, e.g. ('pre_logits',)")
    for output in outputs:
        _check_name(output, "an output name")
    if len(set(outputs)) != len(outputs):
        raise PretextlabError(f"outputs are repeated in {outputs}: name each once")
    _check_name(split, "split")
    _check_name(preprocessing_key, "preprocessing_key")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PretextlabError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    budget = _check_budget(budget)
    if len(images) == 0:
        raise PretextlabError(f"the {split} split has no images: nothing to extract features from")
    known = getattr(network, "output_names", None)
    if known is not None:
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise PretextlabError(f"the network has no output {', '.join(unknown)}: choose from {', '.join(known)}")

    split_dir = Path(cache_dir) / preprocessing_key / split
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PretextlabError(f"cannot create the feature cache folder {split_dir} ({error.strerror})") from error
    with _cache_lock(split_dir):
        return _extract_locked(
            network, views, images, outputs, split_dir, split, int(batch_size), device, progress, budget, workers
        )


def _extract_locked(
    network: nn.Module, views: Views, images: ImageSet, outputs: list[str], split_dir: Path, split: str,
    batch_size: int, device: str | torch.device, progress: bool, budget: int, workers: int,
) -> dict[str, FeatureSet]:
    meta_path = split_dir / META_FILE
    labels_sha = _labels_digest(images.labels)
    num_images = len(images)
    meta = _read_meta(meta_path)
    if meta is None:
        meta = {
            "version": CACHE_VERSION, "num_images": num_images, "labels_sha": labels_sha, "budget": budget,
            "batch_size": batch_size, "outputs": {},
        }
    else:
        _check_meta(meta, split_dir, images, labels_sha, budget)
    for output in outputs:
        state = meta["outputs"].get(output)
        if state and state.get("complete"):
            damage = _damage(split_dir, output, state, num_images)
            if damage is not None:
                _say(f"the cached {split} features of {output} in {split_dir} are damaged ({damage}): rebuilding them")
                del meta["outputs"][output]
    pending = [o for o in outputs if not meta["outputs"].get(o, {}).get("complete", False)]
    if not pending:
        return _complete_sets(split_dir, meta, outputs, split)

    progress_of = {o: meta["outputs"].get(o, {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False}) for o in pending}
    stores: dict[str, np.memmap] = {}
    for output, state in progress_of.items():
        if state["batches_done"] > 0:
            store = _open_store(split_dir / f"{output}.npy", (num_images, state["dim"]), np.float32)
            if store is None:
                _say(f"{split_dir / (output + '.npy')} is missing or does not match its record: extracting {output} again")
                progress_of[output] = {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False}
            else:
                stores[output] = store
    labels_path = split_dir / LABELS_FILE
    # Labels are shared by all outputs and rewritten identically on every pass, so an existing file
    # (holding the labels of outputs already complete) is updated in place, never truncated.
    labels_store = _open_store(labels_path, (num_images,), np.int64)
    if labels_store is None:
        if any(p["batches_done"] > 0 for p in progress_of.values()):
            _say(f"{labels_path} is missing or unreadable: extracting the {split} features again")
            progress_of = {o: {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False} for o in pending}
            stores.clear()
        labels_store = _create_store(labels_path, (num_images,), np.int64)
    if all(p["batches_done"] == 0 for p in progress_of.values()):
        meta["batch_size"] = batch_size
    batch_size = int(meta["batch_size"])
    start_batch = min(p["batches_done"] for p in progress_of.values())
    start_row = min(p["rows_done"] for p in progress_of.values() if p["batches_done"] == start_batch)

    torch_device = resolve_device(device)
    on_cuda = torch_device.type == "cuda"

    def record_progress() -> None:
        for store in stores.values():
            store.flush()
        labels_store.flush()
        meta["outputs"].update(progress_of)
        try:
            atomic.write_json(meta_path, meta)
        except OSError as error:
            raise PretextlabError(f"cannot record the feature cache's progress in {meta_path} ({error.strerror}): free some space and run it again") from error

    loader = BatchLoader(images, batch_size, shuffle=False, start_batch=start_batch, workers=workers, pin_memory=on_cuda)
    total_batches = start_batch + len(loader)
    was_training = network.training
    network.to(torch_device)
    if on_cuda:
        network.to(memory_format=torch.channels_last)
    network.eval()
    row = start_row
    last_checkpoint = time.monotonic()
    bar = tqdm(total=total_batches, initial=start_batch, desc=f"features {split}", unit="batch", disable=not progress)
    try:
        for batch_index, batch in enumerate(loader, start=start_batch):
            count = len(batch)
            writing = [o for o in pending if progress_of[o]["batches_done"] == batch_index]
            if count and writing:
                pooled = _forward_pooled(network, views, batch.images, writing, torch_device, budget)
                for output in writing:
                    values = pooled[output]
                    state = progress_of[output]
                    if output not in stores:
                        state["dim"] = int(values.shape[1])
                        stores[output] = _create_store(split_dir / f"{output}.npy", (num_images, state["dim"]), np.float32)
                    if state["rows_done"] != row:
                        raise PretextlabError(
                            f"the cache of {output} in {split_dir} is out of step with the images (row {state['rows_done']} "
                            f"recorded, {row} expected): delete that folder to rebuild it"
                        )
                    stores[output][row : row + count] = values
                labels_store[row : row + count] = batch.labels.numpy()
            for output in writing:
                progress_of[output]["batches_done"] = batch_index + 1
                progress_of[output]["rows_done"] = row + count
            row += count
            bar.update(1)
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                record_progress()
                last_checkpoint = time.monotonic()
        if any(progress_of[o]["dim"] is None for o in pending):
            raise PretextlabError(f"no image of the {split} split could be decoded: check its image files")
        for store in stores.values():
            store.flush()
        labels_store.flush()
        for output in pending:
            state = progress_of[output]
            state["integrity"] = _integrity(split_dir, output, int(state["rows_done"]), int(state["dim"]))
            state["complete"] = True
    finally:
        bar.close()
        network.train(was_training)
        record_progress()
    return _complete_sets(split_dir, meta, outputs, split)


def _forward_pooled(
    network: nn.Module, views: Views, images: torch.Tensor, outputs: Sequence[str], device: torch.device, budget: int
) -> dict[str, np.ndarray]:
    """One forward pass of a batch: each output pooled per view, then averaged over the V views."""
    on_cuda = device.type == "cuda"
    with torch.inference_mode():
        images = images.to(device, non_blocking=on_cuda)
        inputs, num_views = views(images)
        batch = images.shape[0]
        if inputs.shape[0] != batch * num_views:
            raise PretextlabError(
                f"views returned {inputs.shape[0]} inputs with V={num_views} for {batch} images: it must return B*V inputs"
            )
        if on_cuda:
            inputs = inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
            result = network(inputs)
        if not isinstance(result, dict):
            raise PretextlabError(f"the network must return a dict of named outputs, got {type(result).__name__}")
        missing = [o for o in outputs if o not in result]
        if missing:
            raise PretextlabError(f"the network returned no output {', '.join(missing)}: it returns {', '.join(result)}")
        pooled = {}
        for output in outputs:
            values = pool_to_budget(result[output], budget).float()
            pooled[output] = values.view(batch, num_views, -1).mean(dim=1).cpu().numpy()
    return pooled
