"""The released SGD probe (``sgd_preset`` "paper"): features recomputed from random crops every epoch.

The released ``linear_eval`` (released code, self_supervision/linear_eval.py:123-191) puts the
frozen hub module inside the probe's training graph: every training step decodes a batch, takes a
random 224 crop of each image (the shorter side resized to 256; central crops when scoring;
released code, config/evaluation/rotation_or_exemplar.sh:31-33, preprocess.py:69-77), runs the
frozen network, pools each tap to <= 9000 values and trains one linear (or MLP) head per tap on
the raw features, with the heads' losses summed (linear_eval.py:188-191). It trains on "trainval",
the whole training set, and scores "test", the official validation set (rotation_or_exemplar.sh:26-27).

Here (docs/protocol.md#probes):

- the training view of an image is a random crop of the task's input side from the decoded image,
  then the task's own evaluation transform (``eval_views``: for Rotation/Exemplar [-1, 1]); for the
  patch tasks the released evaluation geometry with a random crop offset (released code,
  config/evaluation/jigsaw_or_relative_patch_location.sh:31-36: resize 224, random 192, 3x3 patches,
  no jitter). Scoring uses the cached central-crop features (``extract_features``), exactly what
  the central crop gives;
- the network stays frozen: eval mode (running BatchNorm statistics) and no gradient through it;
- one forward per batch serves every asked output; each output has its own head, and the summed
  loss gives each head exactly its own gradient (their parameters are disjoint);
- the epoch's order, every crop and every dropout mask are pure functions of (seed, epoch, step),
  so a run resumed from its end-of-epoch checkpoint (heads + optimizer) replays the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.data import BatchLoader, ImageSet
from pretextlab.data.folder import FolderImageSet
from pretextlab.data.imageset import TensorImageSet
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.common import Split, Standardised, check_finite, checked_split
from pretextlab.evaluate.pooling import POOL_BUDGET, pool_to_budget
from pretextlab.evaluate.sgd import PROBE_NAMES, SgdResult, _accuracy, _ProbeHead, _sample_digest, _seeds
from pretextlab.evaluate.sgd_config import LR_REFERENCE_BATCH, SgdConfig

__all__ = ["augmented_sgd_probe", "augmented_views", "whole_training_split"]

CHECKPOINT_FORMAT = 1
# Distinct SeedSequence purposes, so crops and dropout never share a stream with the epoch order.
_PURPOSE_CROPS, _PURPOSE_DROPOUT = 1, 2

TrainViews = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, int]]
Log = Callable[[str], None]


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, C, size, size): one uniformly placed ``size`` square per image
    (released code, preprocess.py:69-77 -> pp_lib.crop with is_training: a random crop)."""
    batch, _, height, width = images.shape
    if size > min(height, width):
        raise PretextlabError(f"a {size}-px crop does not fit images of {height}x{width}: decode them larger")
    top = torch.randint(0, height - size + 1, (batch,), generator=generator, device=generator.device).to(images.device)
    left = torch.randint(0, width - size + 1, (batch,), generator=generator, device=generator.device).to(images.device)
    span = torch.arange(size, device=images.device)
    rows = (top[:, None] + span)[:, :, None]  # (B, size, 1)
    cols = (left[:, None] + span)[:, None, :]  # (B, 1, size)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around the channel slice put the channel last.
    return images[index, :, rows, cols].permute(0, 3, 1, 2)


def augmented_views(task: Any, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The probe-training twin of ``task.eval_views``: the same inputs, from a random crop instead
    of the central one (see the module docstring)."""
    geometry = getattr(task, "eval_geometry", None)
    if geometry is not None:  # the patch tasks: random crop offset in the resized image, no jitter
        from pretextlab.tasks.patches import GRID_CELLS, image_patches

        views, _ = image_patches(images, geometry, train=True, generator=generator)
        return views, GRID_CELLS
    size = min(int(task.options.image_size), *images.shape[-2:])
    # eval_views' central crop of the task's input side is then the identity: only this crop moves.
    return task.eval_views(random_crops(images, size, generator))


def whole_training_split(train: ImageSet, val: ImageSet) -> ImageSet:
    """Train + held-out val as one set in the training pool's order: the released "trainval"."""
    if isinstance(train, TensorImageSet) and isinstance(val, TensorImageSet) and train._images is val._images:
        rows = np.sort(np.concatenate([train._rows, val._rows]))
        return TensorImageSet(train._images, train._all_labels, train.class_names, rows=rows)
    if isinstance(train, FolderImageSet) and isinstance(val, FolderImageSet) and train.root == val.root:
        paths = np.concatenate([train.relative_paths, val.relative_paths])
        labels = np.concatenate([train.labels, val.labels])
        order = np.argsort(paths, kind="stable")
        return FolderImageSet(train.root, paths[order], labels[order], train.class_names, train.image_size)
    raise PretextlabError(
        "the whole training split (train_split='whole') needs train and val from the same dataset: "
        "load them with pretextlab.data.load_dataset"
    )


def _generator(seed: int, purpose: int, epoch: int, step: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), purpose, int(epoch), int(step)]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state >> 1))


def _fingerprint(config: SgdConfig, outputs: Sequence[str], num_classes: int, images: ImageSet, val: dict[str, Split], key: str) -> str:
    recipe = {k: v for k, v in config.to_dict().items() if k not in ("device", "resident")}
    digest = hashlib.sha256(np.ascontiguousarray(images.labels).tobytes()).hexdigest()
    parts = {
        "format": CHECKPOINT_FORMAT, "config": recipe, "outputs": list(outputs), "num_classes": int(num_classes),
        "train_labels": digest, "train_images": len(images), "network": key,
        "val": {o: _sample_digest(*val[o]) for o in outputs},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def frozen_features(
    network: nn.Module, inputs: torch.Tensor, num_views: int, outputs: Sequence[str], budget: int = POOL_BUDGET
) -> dict[str, torch.Tensor]:
    """The frozen network's pooled, view-averaged float32 features of ``inputs`` (B*V rows), no grad."""
    on_cuda = inputs.device.type == "cuda"
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
        result = network(inputs)
    batch = inputs.shape[0] // num_views
    return {o: pool_to_budget(result[o], budget).float().view(batch, num_views, -1).mean(dim=1) for o in outputs}


def augmented_sgd_probe(
    network: nn.Module,
    train_views: TrainViews,
    images: ImageSet,
    val: dict[str, Split],
    test: dict[str, Split],
    outputs: Sequence[str],
    num_classes: int,
    config: SgdConfig,
    network_key: str = "",
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int = 0,
    budget: int = POOL_BUDGET,
) -> dict[str, SgdResult]:
    """Train one SGD head per output on features the frozen ``network`` computes from
    ``train_views(uint8 batch, generator)`` of ``images`` every epoch; follow each on its ``val``
    features, score its ``test`` features once at the end (both precomputed central-crop features,
    raw). Returns the results by output. With ``checkpoint_path`` the heads and optimizer are saved
    (atomically) after every epoch and a later call with the same arguments continues from there;
    ``network_key`` names the network's weights in that checkpoint's fingerprint."""
    started = time.perf_counter()
    if config.features != "augmented" or config.standardize:
        raise PretextlabError("augmented_sgd_probe needs SgdConfig(features='augmented', standardize=False), e.g. SgdConfig.preset('paper')")
    outputs = list(outputs)
    val, test = dict(val), dict(test)
    device = resolve_device(config.device)
    for output in outputs:  # the precomputed probe's checks (shapes, labels, finiteness)
        val[output] = checked_split(val[output], "val", num_classes)
        test[output] = checked_split(test[output], "test", num_classes)
        check_finite(val[output][0], "val")
        check_finite(test[output][0], "test")
    missing = np.flatnonzero(np.bincount(images.labels, minlength=num_classes) == 0)
    if len(missing):
        raise PretextlabError(f"class {missing[0]} has no training image: give at least one labelled image per class")
    n = len(images)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = n // batch_size
    init_seed, shuffle_seed, dropout_seed = _seeds(config.seed)
    heads = nn.ModuleDict()
    for output in outputs:
        head = _ProbeHead(int(val[output][0].shape[1]), num_classes, config, device)
        head.initialise(torch.Generator().manual_seed(init_seed))
        heads[output] = head
    weights = [w for o in outputs for w in heads[o].weights_and_biases()[0]]
    biases = [b for o in outputs for b in heads[o].weights_and_biases()[1]]
    optimizer = torch.optim.SGD(
        [{"params": weights, "weight_decay": config.weight_decay}, {"params": biases, "weight_decay": 0.0}],
        lr=config.peak_lr(batch_size), momentum=config.momentum,
    )
    val_sets = {o: Standardised(val[o][0], None, device) for o in outputs}
    val_labels = {o: torch.as_tensor(np.asarray(val[o][1], dtype=np.int64)).to(device) for o in outputs}

    curves: dict[str, list[dict[str, float]]] = {o: [] for o in outputs}
    start_epoch, earlier_seconds = 0, 0.0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = _fingerprint(config, outputs, num_classes, images, val, network_key) if path is not None else ""
    if path is not None and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: the advice is the same
            raise PretextlabError(f"cannot read the probe checkpoint {path} ({error}): delete it to start the probe over") from error
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            raise PretextlabError(f"the probe checkpoint {path} was written for another configuration: delete it to start over")
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        curves, start_epoch, earlier_seconds = state["curves"], int(state["epoch"]), float(state["seconds"])

    was_training = network.training
    network.to(device)
    # Frozen: BatchNorm uses its running statistics and frozen_features runs without grad, so
    # nothing flows into (or changes) the network.
    network.eval()
    on_cuda = device.type == "cuda"
    label = ", ".join(outputs)
    bar = tqdm(range(start_epoch, config.epochs), desc=f"SGD probe ({config.kind}, on-the-fly crops) {label}",
               unit="epoch", initial=start_epoch, total=config.epochs, disable=not progress)
    try:
        for epoch in bar:
            heads.train()
            loader = BatchLoader(images, batch_size, shuffle=True, seed=shuffle_seed, epoch=epoch, drop_last=True,
                                 workers=workers, pin_memory=on_cuda)
            loss_sums = {o: torch.zeros((), dtype=torch.float64, device=device) for o in outputs}
            steps = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
            lr = config.peak_lr(batch_size)
            for step, batch in enumerate(steps):
                lr = config.learning_rate(epoch * steps_per_epoch + step, steps_per_epoch, batch_size)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                crops = _generator(config.seed, _PURPOSE_CROPS, epoch, step, device)
                inputs, num_views = train_views(batch.images.to(device, non_blocking=on_cuda), crops)
                features = frozen_features(network, inputs, num_views, outputs, budget)
                labels = batch.labels.to(device)
                dropout = _generator(dropout_seed, _PURPOSE_DROPOUT, epoch, step, device)
                losses = {o: F.cross_entropy(heads[o](features[o], dropout), labels) for o in outputs}
                optimizer.zero_grad(set_to_none=True)
                # The released code sums the heads' mean losses (linear_eval.py:191): disjoint
                # parameters, so each head gets exactly its own gradient.
                sum(losses.values()).backward()
                optimizer.step()
                for o in outputs:
                    loss_sums[o] += losses[o].detach()
            steps.close()
            for o in outputs:
                train_loss = float(loss_sums[o]) / steps_per_epoch
                if not math.isfinite(train_loss):
                    raise PretextlabError(
                        f"the {config.kind} probe of {o} diverged in epoch {epoch + 1} (training loss {train_loss}) at lr {lr:g}: "
                        f"lower base_lr (now {config.base_lr:g} per {LR_REFERENCE_BATCH} images)"
                    )
                curves[o].append({"epoch": epoch + 1, "lr": lr, "train_loss": train_loss,
                                  "val_top1_percent": _accuracy(heads[o], val_sets[o], val_labels[o])})
            if path is not None:
                atomic.save_torch(path, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch + 1,
                    "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "curves": curves,
                    "seconds": earlier_seconds + time.perf_counter() - started,
                })
            bar.set_postfix({o: f"{curves[o][-1]['val_top1_percent']:.2f}%" for o in outputs})
    finally:
        bar.close()
        network.train(was_training)

    seconds = earlier_seconds + time.perf_counter() - started
    results = {}
    for o in outputs:
        test_top1 = _accuracy(heads[o], Standardised(test[o][0], None, device), torch.as_tensor(np.asarray(test[o][1], dtype=np.int64)).to(device))
        best = max(curves[o], key=lambda e: e["val_top1_percent"])
        results[o] = SgdResult(
            probe=PROBE_NAMES[config.kind],
            val_top1_percent=curves[o][-1]["val_top1_percent"],
            test_top1_percent=test_top1,
            chosen={"epoch": config.epochs, "lr": config.peak_lr(batch_size), "batch_size": batch_size,
                    "weight_decay": config.weight_decay, "best_val_epoch": best["epoch"],
                    "best_val_top1_percent": best["val_top1_percent"]},
            curve=curves[o], seconds=seconds, train_size=int(n),
        )
    return results
