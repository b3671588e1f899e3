"""Feature extraction split over the ranks of a process group, into the one cache ``features`` keeps.

The split's batches are cut into one contiguous block per rank; each rank runs the network on its
block and writes its rows at their offsets in the same ``<output>.npy`` and ``labels.npy`` files.
Rank 0 alone holds the folder's lock for the whole job (another job or process waits, as for one
process), reads and checks the record, creates the files (space reserved) and, once every rank has
flushed its rows, records the per-block CRC-32s and marks the outputs complete: the finished cache
is the one a single process writes, reused by either; its record says how many ranks filled each
output (``ranks``; absent: one process). A killed job resumes with the same
world size and batch size: each rank records its progress in ``shard<rank>of<world>.json``.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.data import BatchLoader, ImageSet
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.cache_files import LABELS_FILE, META_FILE, cache_lock, create_store, integrity, open_store, read_meta, storage_dtype
from pretextlab.evaluate.common import Shard
from pretextlab.evaluate.features import (
    FeatureSet, Views, _complete_sets, forward_pooled, cache_record, checked_request, encoded, make_folder,
)
from pretextlab.evaluate.pooling import POOL_BUDGET

PROGRESS_EVERY = 20  # batches between a rank's progress records


def _progress_path(split_dir: Path, shard: Shard) -> Path:
    return split_dir / f"shard{shard.rank}of{shard.world}.json"


def _batch_block(num_images: int, batch_size: int, shard: Shard) -> tuple[int, int]:
    """This rank's rows: a contiguous block of whole batches."""
    batches = -(-num_images // batch_size)
    first, last = batches * shard.rank // shard.world, batches * (shard.rank + 1) // shard.world
    return first * batch_size, min(last * batch_size, num_images)


def _plan(
    network: nn.Module, views: Views, images: ImageSet, outputs: list[str], split_dir: Path, batch_size: int,
    device: torch.device, budget: int, feature_dtype: str, shard: Shard,
) -> dict[str, Any]:
    """Rank 0, under the lock: what is complete, what the ranks extract, the files ready to write."""
    num_images = len(images)
    meta, pending = cache_record(split_dir, images, outputs, split_dir.name, batch_size, budget, feature_dtype)
    if not pending:
        return {"meta": meta, "pending": [], "resume": False}
    job = {"world": shard.world, "batch_size": batch_size, "outputs": pending}
    dims = {o: meta["outputs"].get(o, {}).get("dim") for o in pending}
    dtype = storage_dtype(feature_dtype)
    resume = meta.get("sharded") == job and all(
        open_store(split_dir / f"{o}.npy", (num_images, dims[o]), dtype) is not None for o in pending
    ) and open_store(split_dir / LABELS_FILE, (num_images,), np.int64) is not None
    if not resume:
        # An image alone through the network gives each output's width, so the files can be made now.
        first = next(iter(BatchLoader(images.subset(np.arange(1)), 1, shuffle=False)))
        network.eval()
        widths = forward_pooled(network, views, first.images, pending, device, budget)
        dims = {o: int(widths[o].shape[1]) for o in pending}
        for o in pending:
            create_store(split_dir / f"{o}.npy", (num_images, dims[o]), dtype).flush()
        if open_store(split_dir / LABELS_FILE, (num_images,), np.int64) is None:
            create_store(split_dir / LABELS_FILE, (num_images,), np.int64).flush()
        for stale in split_dir.glob("shard*of*.json"):
            stale.unlink()
    meta["outputs"].update({o: {"batches_done": 0, "rows_done": 0, "dim": dims[o], "complete": False} for o in pending})
    meta.update(sharded=job, batch_size=batch_size)
    atomic.write_json(split_dir / META_FILE, meta)
    return {"meta": meta, "pending": pending, "resume": resume}


def _extract_block(
    network: nn.Module, views: Views, images: ImageSet, pending: list[str], dims: dict[str, int], split_dir: Path, split: str,
    batch_size: int, device: torch.device, progress: bool, budget: int, workers: int, feature_dtype: str, shard: Shard,
    resume: bool,
) -> None:
    """This rank's block of batches, written at their offsets; progress recorded in its own file."""
    num_images = len(images)
    first_row, end_row = _batch_block(num_images, batch_size, shard)
    progress_path = _progress_path(split_dir, shard)
    done = json.loads(progress_path.read_text())["batches_done"] if resume and progress_path.exists() else 0
    stores = {o: open_store(split_dir / f"{o}.npy", (num_images, dims[o]), storage_dtype(feature_dtype)) for o in pending}
    labels = open_store(split_dir / LABELS_FILE, (num_images,), np.int64)
    if labels is None or any(store is None for store in stores.values()):
        raise PretextlabError(f"the feature cache files in {split_dir} changed while this job was writing them: run it again")

    def record(batches: int) -> None:
        for store in (*stores.values(), labels):
            store.flush()
        atomic.write_json(progress_path, {"batches_done": batches})

    block = images.subset(np.arange(first_row, end_row))
    loader = BatchLoader(block, batch_size, shuffle=False, start_batch=done, workers=workers, pin_memory=device.type == "cuda")
    was_training = network.training
    network.eval()
    row = first_row + done * batch_size
    bar = tqdm(total=done + len(loader), initial=done, desc=f"features {split} (rank {shard.rank})", unit="batch",
               disable=not progress or shard.rank != 0)
    try:
        for index, batch in enumerate(loader, start=done):
            count = len(batch)
            if count:
                pooled = forward_pooled(network, views, batch.images, pending, device, budget)
                for output in pending:
                    stores[output][row : row + count] = encoded(pooled[output], feature_dtype, f"the {split} features of {output}")
                labels[row : row + count] = batch.labels.numpy()
            row += count
            bar.update(1)
            if (index + 1) % PROGRESS_EVERY == 0:
                record(index + 1)
        record(done + len(loader))
    finally:
        bar.close()
        network.train(was_training)


def extract_features_sharded(
    network: nn.Module, views: Views, images: ImageSet, outputs: Sequence[str], cache_dir: str | Path, split: str,
    preprocessing_key: str, shard: Shard, batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = True,
    budget: int = POOL_BUDGET, workers: int = 0, feature_dtype: str = "float32",
) -> dict[str, FeatureSet]:
    """``features.extract_features`` with the work split over ``shard``'s ranks (every rank calls it
    with the same arguments); returns the same complete, checked sets on every rank."""
    outputs, budget, split_dir = checked_request(
        network, images, outputs, cache_dir, split, preprocessing_key, batch_size, budget, feature_dtype
    )
    torch_device = resolve_device(device)
    network.to(torch_device)
    with ExitStack() as held:
        plan: dict[str, Any] = {}
        if shard.rank == 0:
            try:
                make_folder(split_dir)
                held.enter_context(cache_lock(split_dir))
                plan = _plan(network, views, images, outputs, split_dir, int(batch_size), torch_device, budget, feature_dtype, shard)
            except PretextlabError as error:
                plan = {"error": str(error)}
        plan = shard.broadcast_object(plan)
        if "error" in plan:  # every rank stops with rank 0's message
            raise PretextlabError(plan["error"])
        meta, pending = plan["meta"], plan["pending"]
        if pending:
            dims = {o: int(meta["outputs"][o]["dim"]) for o in pending}
            _extract_block(network, views, images, pending, dims, split_dir, split, int(meta["batch_size"]), torch_device,
                           progress, budget, workers, feature_dtype, shard, plan["resume"])
            shard.barrier()  # every rank's rows are flushed
            if shard.rank == 0:
                batches = -(-len(images) // int(meta["batch_size"]))
                for output in pending:
                    meta["outputs"][output].update(
                        batches_done=batches, rows_done=len(images), complete=True, ranks=shard.world,
                        integrity=integrity(split_dir, output, len(images), dims[output]),
                    )
                meta.pop("sharded", None)
                atomic.write_json(split_dir / META_FILE, meta)
                for finished in split_dir.glob("shard*of*.json"):
                    finished.unlink()
            shard.barrier()  # the record is complete before any rank reads it back
    return _complete_sets(split_dir, read_meta(split_dir / META_FILE) or meta, outputs, split)
