"""The study's SGD-trained probes on frozen features: a linear layer ("linear") or an MLP ("mlp").

The recipe is the released evaluation code's (``linear_eval.py`` + ``trainer.py``):

- momentum SGD (0.9), softmax cross-entropy averaged over the minibatch;
- learning rate ``base_lr x batch / 256``, set per step: an optional linear warm-up, then x``decay_factor``
  once ``decay_epochs[i]`` epochs are done (30 and 50 of 70 epochs at batch 512; for the reported
  numbers 480 and 500 of 520 epochs at batch 2048);
- ``N // batch`` steps per epoch over a fresh shuffle (the remainder is left out that epoch);
- weight decay on the weight matrices only, never on biases; the released evaluation script does not
  set it, and its probe heads default to 0, so the presets use 0;
- MLP: hidden 1000, ReLU, dropout 0.5 (inverted, active in training only), then the classifier;
- Glorot-uniform weights and zero biases (TensorFlow's layer defaults).

The number the study reports is the *final* model's accuracy (no early stopping): ``val_top1_percent``
and ``test_top1_percent`` are the final epoch's, and the test split is scored exactly once, after training.
The per-epoch validation accuracy is kept in ``curve`` (the convergence plot), with the best epoch
noted in ``chosen`` for information only.

Features are standardised with the training split's column mean and std; columns constant on the
training split are set to 0 everywhere (nothing can be learnt from them). When the training and
validation matrices fit (float32, standardised) they are moved to the device once; otherwise each
minibatch is gathered from the given arrays (e.g. an ``np.memmap``) and moved on its own. Both
paths give bit-identical results on the CPU. Shuffling, initialisation and dropout draw from
their own seeded generators (nothing global), so a fixed seed gives the same result on the CPU,
and a run resumed from its end-of-epoch checkpoint ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.common import ProbeData, ProbeResult, Standardised, accuracy_percent, check_finite, split_moments
from pretextlab.evaluate.sgd_config import LR_REFERENCE_BATCH, SgdConfig

__all__ = ["SgdConfig", "SgdResult", "sgd_probe"]

PROBE_NAMES = {"linear": "sgd", "mlp": "mlp"}
# Share of free memory the resident features may take: the rest is left for the head, its
# gradients and momentum, the batch activations and whatever else shares the device.
DEVICE_MEMORY_SHARE = 0.7
HOST_MEMORY_SHARE = 0.5
CHECKPOINT_FORMAT = 1
FINGERPRINT_ROWS = 32  # rows sampled from each split to recognise the data a checkpoint belongs to

CurveCallback = Callable[[dict[str, float]], None]


@dataclass
class SgdResult(ProbeResult):
    """One SGD probe's outcome (accuracies in percent), shaped like the L-BFGS probe's result.

    ``val_top1_percent`` / ``test_top1_percent``: the *final* model's (as the study reports).
    ``chosen``: the schedule that produced them (final ``epoch``, peak ``lr``, ``batch_size``,
    ``weight_decay``) plus, for information, ``best_val_epoch`` / ``best_val_top1_percent`` from the curve.
    ``curve``: one ``{epoch, lr, train_loss, val_top1_percent}`` per epoch (1-based epochs; ``lr`` is the
    rate of the epoch's last step; ``train_loss`` the mean minibatch loss, weight decay excluded).
    ``seconds`` adds up the time of every call that worked on this probe (resumes included).
    """

    curve: list[dict[str, float]] = field(default_factory=list)


class _ProbeHead(nn.Module):
    """A linear classifier, or hidden layer + ReLU + dropout + classifier.

    Dropout draws its masks from a caller-given generator, not the global one, so that a seeded run
    is reproducible and a resumed run continues the very same stream of masks.
    """

    def __init__(self, dim: int, num_classes: int, config: SgdConfig, device: torch.device) -> None:
        super().__init__()
        # skip_init: the layers are built without drawing from the global RNG; _initialise fills them.
        if config.kind == "mlp":
            self.hidden = torch.nn.utils.skip_init(nn.Linear, dim, config.hidden, device=device)
            self.classifier = torch.nn.utils.skip_init(nn.Linear, config.hidden, num_classes, device=device)
        else:
            self.hidden = None
            self.classifier = torch.nn.utils.skip_init(nn.Linear, dim, num_classes, device=device)
        self.dropout = float(config.dropout)

    def initialise(self, generator: torch.Generator) -> None:
        """Glorot-uniform weights, zero biases; drawn on the CPU so every device starts identically."""
        with torch.no_grad():
            for layer in (self.hidden, self.classifier):
                if layer is None:
                    continue
                fan_out, fan_in = layer.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                values = torch.rand(layer.weight.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
                layer.weight.copy_(values)
                layer.bias.zero_()

    def weights_and_biases(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        layers = [layer for layer in (self.hidden, self.classifier) if layer is not None]
        return [layer.weight for layer in layers], [layer.bias for layer in layers]

    def forward(self, x: torch.Tensor, dropout_generator: torch.Generator | None = None) -> torch.Tensor:
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
            if self.training and self.dropout > 0:
                keep = torch.rand(x.shape, generator=dropout_generator, device=x.device) >= self.dropout
                x = x * keep / (1.0 - self.dropout)
        return self.classifier(x)


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(DEVICE_MEMORY_SHARE * free)
    try:
        return int(HOST_MEMORY_SHARE * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not a Linux-like host: assume it fits
        return None


def _keep_resident(mode: str, needed_bytes: int, device: torch.device) -> bool:
    if mode == "stream":
        return False
    available = _available_bytes(device)
    fits = available is None or needed_bytes <= available
    if mode == "device" and not fits:
        raise PretextlabError(
            f"the standardised train+val features need {needed_bytes / 2**30:.1f} GiB but only about "
            f"{available / 2**30:.1f} GiB is free on {device}: use resident='stream' (or 'auto')"
        )
    return fits


def _accuracy(model: _ProbeHead, split: Standardised, labels: torch.Tensor) -> float:
    model.eval()
    return accuracy_percent(model, split, labels)


def _sample_digest(features: np.ndarray, labels: np.ndarray) -> str:
    rows = np.unique(np.linspace(0, len(features) - 1, min(len(features), FINGERPRINT_ROWS)).astype(np.int64))
    digest = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
    digest.update(str(features.shape).encode())
    digest.update(np.ascontiguousarray(np.asarray(features[rows], dtype=np.float32)).tobytes())
    return digest.hexdigest()


def _fingerprint(config: SgdConfig, num_classes: int, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """What a checkpoint must match to be resumed: the schedule, the model and the data. The
    device and residency are left out: they do not change what is computed."""
    # features/train_split are the caller's business (they choose the arrays given here): left out,
    # so checkpoints written before those fields existed still resume.
    recipe = {k: v for k, v in config.to_dict().items() if k not in ("device", "resident", "features", "train_split")}
    parts = {
        "format": CHECKPOINT_FORMAT,
        "config": recipe,
        "num_classes": int(num_classes),
        "train": _sample_digest(*splits["train"]),
        "val": _sample_digest(*splits["val"]),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for initialisation, shuffling and dropout, derived from one seed."""
    init, shuffle, dropout = (int(s.generate_state(1, np.uint64)[0] >> 1) for s in np.random.SeedSequence(seed).spawn(3))
    return init, shuffle, dropout


def _load_checkpoint(path: Path, fingerprint: str, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: the advice is the same
        raise PretextlabError(f"cannot read the probe checkpoint {path} ({error}): delete it to start the probe over") from error
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise PretextlabError(
            f"the probe checkpoint {path} was written for another configuration or other features: "
            f"delete it to start over, or give this probe its own checkpoint_path"
        )
    if state["device_type"] != device.type:
        raise PretextlabError(
            f"the probe checkpoint {path} was written on {state['device_type']} and cannot continue its random "
            f"streams on {device.type}: resume it on {state['device_type']}, or delete it to start over"
        )
    return state


def sgd_probe(
    data: ProbeData,
    config: SgdConfig | None = None,
    progress: bool = True,
    curve_callback: CurveCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    label: str = "",
) -> SgdResult:
    """Train a linear or MLP probe with SGD on ``data.train``, follow it on ``data.val``, score ``data.test`` once.

    Each split is (features float (N, D), labels int (N,)); features may be ``np.memmap``s. The
    result's accuracies are the final model's, in percent. ``label`` names what is probed (e.g.
    the layer) on the progress bar. ``curve_callback`` receives
    each epoch's curve entry once that epoch is checkpointed. With ``checkpoint_path``, the state
    is saved (atomically) after every epoch and a later call with the same arguments continues
    from it; a finished checkpoint is only scored.
    """
    started = time.perf_counter()
    config = config or SgdConfig()
    if not isinstance(config, SgdConfig):
        raise PretextlabError(f"config must be an SgdConfig (e.g. SgdConfig.paper('linear')), got {type(config).__name__}")
    if config.features != "precomputed":
        raise PretextlabError(
            f"SgdConfig(features={config.features!r}) recomputes features from images each epoch, so it needs the "
            "network: run it through evaluate (probe_run / evaluate/augmented.py), or use features='precomputed' here"
        )
    splits, num_classes = data.checked(), data.num_classes
    train_x, train_y = splits["train"]
    device = resolve_device(config.device)
    moments = split_moments(train_x, "train", config.standardize)
    check_finite(splits["val"][0], "val")
    check_finite(splits["test"][0], "test")

    n, dim = train_x.shape
    resident = _keep_resident(config.resident, 4 * dim * (n + len(splits["val"][0])), device)
    train_set = Standardised(train_x, moments, device, resident)
    val_set = Standardised(splits["val"][0], moments, device, resident)
    labels = {name: torch.from_numpy(y).to(device) for name, (_, y) in splits.items()}

    # The released code drops each epoch's remainder; a training set smaller than one batch is
    # taken whole instead (one step per epoch), and the learning rate scales with that batch.
    batch_size = min(config.batch_size, n)
    steps_per_epoch = n // batch_size
    init_seed, shuffle_seed, dropout_seed = _seeds(config.seed)
    model = _ProbeHead(dim, num_classes, config, device)
    model.initialise(torch.Generator().manual_seed(init_seed))
    weights, biases = model.weights_and_biases()
    optimizer = torch.optim.SGD(
        [{"params": weights, "weight_decay": config.weight_decay}, {"params": biases, "weight_decay": 0.0}],
        lr=config.peak_lr(batch_size),
        momentum=config.momentum,
    )
    shuffle_generator = torch.Generator().manual_seed(shuffle_seed)
    dropout_generator = torch.Generator(device=device).manual_seed(dropout_seed)

    curve: list[dict[str, float]] = []
    start_epoch = 0
    earlier_seconds = 0.0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = _fingerprint(config, num_classes, splits) if path is not None else ""
    if path is not None and path.exists():
        state = _load_checkpoint(path, fingerprint, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffle_generator.set_state(state["shuffle_rng"])
        dropout_generator.set_state(state["dropout_rng"])
        curve = list(state["curve"])
        start_epoch = int(state["epoch"])
        earlier_seconds = float(state["seconds"])

    bar = tqdm(
        range(start_epoch, config.epochs),
        desc=f"SGD probe ({config.kind}) {label}".rstrip(),
        unit="epoch",
        initial=start_epoch,
        total=config.epochs,
        disable=not progress,
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=shuffle_generator)
        order_on_device = order.to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps_per_epoch):
            lr = config.learning_rate(epoch * steps_per_epoch + step, steps_per_epoch, batch_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = slice(step * batch_size, (step + 1) * batch_size)
            logits = model(train_set.rows(order[batch], order_on_device[batch]), dropout_generator)
            loss = F.cross_entropy(logits, labels["train"].index_select(0, order_on_device[batch]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()  # summed on the device: no host sync per step
        train_loss = float(loss_sum) / steps_per_epoch
        if not math.isfinite(train_loss):
            raise PretextlabError(
                f"the {config.kind} probe diverged in epoch {epoch + 1} (training loss {train_loss}) at lr {lr:g}: "
                f"lower base_lr (now {config.base_lr:g} per {LR_REFERENCE_BATCH} images) or keep standardize=True"
            )
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "val_top1_percent": _accuracy(model, val_set, labels["val"])}
        curve.append(entry)
        if path is not None:
            atomic.save_torch(
                path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": fingerprint,
                    "device_type": device.type,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "shuffle_rng": shuffle_generator.get_state(),
                    "dropout_rng": dropout_generator.get_state(),
                    "curve": curve,
                    "seconds": earlier_seconds + time.perf_counter() - started,
                },
            )
        bar.set_postfix(val=f"{entry['val_top1_percent']:.2f}%", loss=f"{train_loss:.4f}", lr=f"{lr:.3g}")
        if curve_callback is not None:
            curve_callback(dict(entry))
    bar.close()

    test_set = Standardised(splits["test"][0], moments, device)
    test_top1 = _accuracy(model, test_set, labels["test"])
    best = max(curve, key=lambda e: e["val_top1_percent"])  # the first of equals: the earliest epoch
    return SgdResult(
        probe=PROBE_NAMES[config.kind],
        val_top1_percent=curve[-1]["val_top1_percent"],
        test_top1_percent=test_top1,
        chosen={
            "epoch": config.epochs,
            "lr": config.peak_lr(batch_size),
            "batch_size": batch_size,
            "weight_decay": config.weight_decay,
            "best_val_epoch": best["epoch"],
            "best_val_top1_percent": best["val_top1_percent"],
        },
        curve=curve,
        seconds=earlier_seconds + time.perf_counter() - started,
        train_size=int(n),
    )
