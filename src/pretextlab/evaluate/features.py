"""Frozen features at named outputs: pooled to the study's budget, averaged over views, cached on disk.

Cache layout, one folder per (preprocessing key, split)::

    cache_dir/<preprocessing_key>/<split>/<output>.npy   float32 (N, D) (or --feature-dtype), written in row order
    cache_dir/<preprocessing_key>/<split>/labels.npy     int64 (N,)
    cache_dir/<preprocessing_key>/<split>/meta.json      how many batches/rows of each output are done
    cache_dir/<preprocessing_key>/<split>/.lock          held (flock) by the one process extracting

``meta.json`` is written atomically, and only after the rows it counts have been flushed, so an
interrupted extraction (Ctrl-C, a crash, a killed job) resumes from the last recorded batch and
ends bitwise identical to an uninterrupted one; a completed cache is returned without running the
network at all. The preprocessing key must change whenever the network, its weights, the views or
the images change (``probe_run`` puts the checkpoint's step and content hash in it): the cache
checks only the image count, labels and pooling budget.

Nothing damaged is used, a full disk is a clear error, and processes sharing a cache take turns:
see ``cache_files`` (also for float16/bfloat16 storage). The pooling rule is ``pooling``'s. Under
torchrun the ranks fill one cache together: ``sharded_features``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.data import BatchLoader, ImageSet
from pretextlab.devices import resolve_device
from pretextlab.evaluate.cache_files import (
    CACHE_VERSION, LABELS_FILE, META_FILE, Bfloat16Rows, cache_lock, check_meta, create_store, damage, integrity, open_store,
    read_meta, say, storage_dtype,
)
from pretextlab.evaluate.pooling import POOL_BUDGET, _check_budget, pool_size, pool_to_budget, pooled_dim
from pretextlab.errors import PretextlabError

__all__ = ["FeatureSet", "POOL_BUDGET", "extract_features", "pool_size", "pool_to_budget", "pooled_dim"]

CHECKPOINT_SECONDS = 10.0  # how often progress is recorded during a long extraction

Views = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


@dataclass
class FeatureSet:
    """The cached features of one split at one output.

    ``features`` reads as float32 (N, D), normally a read-only ``np.memmap`` over ``path`` (a
    ``Bfloat16Rows`` over one for bfloat16 storage), so several large splits never need to sit in
    RAM at once; index it (``features[rows]``) to load rows.
    """

    features: np.ndarray | Bfloat16Rows
    labels: np.ndarray  # int64 (N,)
    output: str
    split: str
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise PretextlabError(f"{what} must be a non-empty name usable as a folder name (no '/', '\\', '..'), got {value!r}")
    return value


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def encoded(values: np.ndarray, feature_dtype: str, what: str) -> np.ndarray:
    """float32 features as the cache stores them (``cache_files.storage_dtype``), rounded to nearest."""
    if feature_dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported below as an error
        stored = values.astype(storage_dtype(feature_dtype), copy=False)
    if feature_dtype == "float16" and not np.isfinite(stored).all() and np.isfinite(values).all():
        raise PretextlabError(
            f"{what} has values beyond float16's range (|x| > 65504): use --feature-dtype bfloat16 (float32's range) or float32"
        )
    return stored


def _complete_sets(split_dir: Path, meta: dict[str, Any], outputs: Sequence[str], split: str) -> dict[str, FeatureSet]:
    labels_all = np.load(split_dir / LABELS_FILE, mmap_mode="r")
    sets = {}
    for output in outputs:
        rows = int(meta["outputs"][output]["rows_done"])
        path = split_dir / f"{output}.npy"
        features = np.load(path, mmap_mode="r")
        if meta.get("feature_dtype") == "bfloat16":
            features = Bfloat16Rows(features)
        sets[output] = FeatureSet(
            features=features[:rows], labels=np.array(labels_all[:rows], dtype=np.int64), output=output, split=split, path=path
        )
    return sets


def checked_request(
    network: nn.Module, images: ImageSet, outputs: Sequence[str], cache_dir: str | Path, split: str, preprocessing_key: str,
    batch_size: int, budget: int, feature_dtype: str,
) -> tuple[list[str], int, Path]:
    """An extraction's arguments checked before anything is created: (outputs, budget, split folder)."""
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
    storage_dtype(feature_dtype)  # a clear error for an unknown name, before anything is created
    if len(images) == 0:
        raise PretextlabError(f"the {split} split has no images: nothing to extract features from")
    known = getattr(network, "output_names", None)
    if known is not None:
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise PretextlabError(f"the network has no output {', '.join(unknown)}: choose from {', '.join(known)}")
    return outputs, budget, Path(cache_dir) / preprocessing_key / split


def make_folder(split_dir: Path) -> None:
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PretextlabError(f"cannot create the feature cache folder {split_dir} ({error.strerror})") from error


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
    feature_dtype: str = "float32",
) -> dict[str, FeatureSet]:
    """Pooled, view-averaged features of every image of ``images`` at each of ``outputs``, cached.

    ``views(uint8 (B, 3, S, S) on the device) -> (float inputs (B*V, ...), V)`` with the V views of
    an image adjacent (image-major), as ``PretextTask.eval_views`` returns them. One forward pass of
    the frozen network (eval mode, no grad; bf16 autocast and channels_last on CUDA) serves every
    output still missing from the cache. Outputs already complete (and intact: see the module doc)
    are read back, not recomputed. A resumed extraction keeps the batch size it started with, so
    its batches are the same. ``network`` is moved to ``device`` (and to channels_last on CUDA);
    its train/eval mode is restored. Another process extracting into the same folder is waited for.
    ``feature_dtype`` (float32, bfloat16, float16) is how the cache stores them; the preprocessing
    key must differ between dtypes (``probe_run`` puts a non-float32 dtype in it).
    """
    outputs, budget, split_dir = checked_request(
        network, images, outputs, cache_dir, split, preprocessing_key, batch_size, budget, feature_dtype
    )
    make_folder(split_dir)
    with cache_lock(split_dir):
        return _extract_locked(
            network, views, images, outputs, split_dir, split, int(batch_size), device, progress, budget, workers, feature_dtype
        )


def cache_record(
    split_dir: Path, images: ImageSet, outputs: list[str], split: str, batch_size: int, budget: int, feature_dtype: str,
) -> tuple[dict[str, Any], list[str]]:
    """The folder's record (checked against these images and settings; a new one if none) with
    damaged outputs dropped, and the outputs still to extract. Called under the folder's lock."""
    labels_sha = _labels_digest(images.labels)
    num_images = len(images)
    meta = read_meta(split_dir / META_FILE)
    if meta is None:
        meta = {
            "version": CACHE_VERSION, "num_images": num_images, "labels_sha": labels_sha, "budget": budget,
            "batch_size": batch_size, "outputs": {}, "feature_dtype": feature_dtype,
        }
    else:
        check_meta(meta, split_dir, num_images, labels_sha, budget, feature_dtype)
    for output in outputs:
        state = meta["outputs"].get(output)
        if state and state.get("complete"):
            problem = damage(split_dir, output, state, num_images, feature_dtype)
            if problem is not None:
                say(f"the cached {split} features of {output} in {split_dir} are damaged ({problem}): rebuilding them")
                del meta["outputs"][output]
    return meta, [o for o in outputs if not meta["outputs"].get(o, {}).get("complete", False)]


def _extract_locked(
    network: nn.Module, views: Views, images: ImageSet, outputs: list[str], split_dir: Path, split: str,
    batch_size: int, device: str | torch.device, progress: bool, budget: int, workers: int, feature_dtype: str,
) -> dict[str, FeatureSet]:
    meta_path = split_dir / META_FILE
    num_images = len(images)
    meta, pending = cache_record(split_dir, images, outputs, split, batch_size, budget, feature_dtype)
    if not pending:
        return _complete_sets(split_dir, meta, outputs, split)

    progress_of = {o: meta["outputs"].get(o, {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False}) for o in pending}
    stores: dict[str, np.memmap] = {}
    for output, state in progress_of.items():
        if state["batches_done"] > 0:
            store = open_store(split_dir / f"{output}.npy", (num_images, state["dim"]), storage_dtype(feature_dtype))
            if store is None:
                say(f"{split_dir / (output + '.npy')} is missing or does not match its record: extracting {output} again")
                progress_of[output] = {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False}
            else:
                stores[output] = store
    labels_path = split_dir / LABELS_FILE
    # Labels are shared by all outputs and rewritten identically on every pass, so an existing file
    # (holding the labels of outputs already complete) is updated in place, never truncated.
    labels_store = open_store(labels_path, (num_images,), np.int64)
    if labels_store is None:
        if any(p["batches_done"] > 0 for p in progress_of.values()):
            say(f"{labels_path} is missing or unreadable: extracting the {split} features again")
            progress_of = {o: {"batches_done": 0, "rows_done": 0, "dim": None, "complete": False} for o in pending}
            stores.clear()
        labels_store = create_store(labels_path, (num_images,), np.int64)
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
                pooled = forward_pooled(network, views, batch.images, writing, torch_device, budget)
                for output in writing:
                    values = pooled[output]
                    state = progress_of[output]
                    if output not in stores:
                        state["dim"] = int(values.shape[1])
                        stores[output] = create_store(split_dir / f"{output}.npy", (num_images, state["dim"]), storage_dtype(feature_dtype))
                    if state["rows_done"] != row:
                        raise PretextlabError(
                            f"the cache of {output} in {split_dir} is out of step with the images (row {state['rows_done']} "
                            f"recorded, {row} expected): delete that folder to rebuild it"
                        )
                    stores[output][row : row + count] = encoded(values, feature_dtype, f"the {split} features of {output}")
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
            state["integrity"] = integrity(split_dir, output, int(state["rows_done"]), int(state["dim"]))
            state["complete"] = True
    finally:
        bar.close()
        network.train(was_training)
        record_progress()
    return _complete_sets(split_dir, meta, outputs, split)


def forward_pooled(
    network: nn.Module, views: Views, images: torch.Tensor, outputs: Sequence[str], device: torch.device, budget: int
) -> dict[str, np.ndarray]:
    """One forward pass of a batch: each output pooled per view, then averaged over the V views.

    Public: the kNN monitor (training/knn_monitor.py) pools with this exact rule, not a copy."""
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
