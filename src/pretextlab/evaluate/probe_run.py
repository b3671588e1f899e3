"""Evaluate a frozen representation: extract (cached) features at named outputs, fit a probe.

This is the glue between a trained run, a downstream dataset and the probes. Every result is
stored as JSON in the run directory with its full recipe (run, output, probe, labels, dataset,
split sizes, regularisation chosen), so every number can be traced back to what produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pretextlab import atomic
from pretextlab.data import DatasetSplits, few_label_subset, load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.features import extract_features
from pretextlab.evaluate.lbfgs import LbfgsConfig, lbfgs_probe
from pretextlab.evaluate.sgd import SgdConfig, sgd_probe

PROBES = ("lbfgs", "sgd", "mlp")
SGD_SCHEDULES = ("paper", "paper_long")
PROBES_DIR = "probes"
FEATURES_DIR = "features"


@dataclass
class EvalConfig:
    """What to probe and how; the run itself is named separately."""

    outputs: tuple[str, ...] = ("pre_logits",)
    probe: str = "lbfgs"
    dataset: str | None = None  # None: the run's own pretext dataset
    data_dir: str | None = None
    val_size: float | None = None
    limit: int | None = None
    test_limit: int | None = None
    labels_per_class: int | None = None
    label_fraction: float | None = None
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    l2_grid: tuple[float, ...] | None = None
    # SGD-trained probes ("sgd" linear, "mlp"): the study's schedule, optionally shortened in proportion.
    sgd_schedule: str = "paper"  # "paper": 70 epochs, batch 512; "paper_long": 520 epochs, batch 2048
    sgd_epochs: int | None = None  # None: the schedule's own length
    sgd_batch_size: int | None = None
    sgd_base_lr: float | None = None

    def probe_config(self) -> LbfgsConfig | SgdConfig:
        """The probe's own config, fully resolved (stored with every result)."""
        if self.probe == "lbfgs":
            lbfgs = LbfgsConfig(device=self.device)
            return dataclasses.replace(lbfgs, l2_grid=tuple(self.l2_grid)) if self.l2_grid is not None else lbfgs
        if self.sgd_schedule not in SGD_SCHEDULES:
            raise PretextlabError(f"unknown SGD schedule {self.sgd_schedule!r}: choose one of {', '.join(SGD_SCHEDULES)}")
        kind = "linear" if self.probe == "sgd" else "mlp"
        preset = getattr(SgdConfig, self.sgd_schedule)
        sgd = preset(kind, device=self.device, seed=self.seed)
        if self.sgd_epochs is not None:
            sgd = sgd.scaled(self.sgd_epochs)
        if self.sgd_batch_size is not None:
            sgd = dataclasses.replace(sgd, batch_size=self.sgd_batch_size)
        if self.sgd_base_lr is not None:
            sgd = dataclasses.replace(sgd, base_lr=self.sgd_base_lr)
        return sgd

    def probe_tag(self) -> str:
        """The probe and, for SGD-trained ones, its schedule: part of the result's file name."""
        if self.probe == "lbfgs":
            return "lbfgs"
        probe_config = self.probe_config()
        return f"{self.probe}-{self.sgd_schedule}{probe_config.epochs}"

    def label_tag(self) -> str:
        if self.labels_per_class is not None:
            return f"{self.labels_per_class}pc"
        if self.label_fraction is not None:
            return f"{self.label_fraction:g}frac"
        return "all"


class PixelNetwork(nn.Module):
    """The raw-pixel baseline as a 'network' with one named output."""

    output_names = ("pixels",)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": x.flatten(1)}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def probe_representation(
    network: nn.Module,
    views: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
    splits: DatasetSplits,
    outputs: Sequence[str],
    cache_dir: Path,
    preprocessing_key: str,
    config: EvalConfig,
    progress: bool = True,
    probe_checkpoint_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Features of every split at ``outputs`` (one pass per split, cached), then one probe per output."""
    if config.probe not in PROBES:
        raise PretextlabError(f"unknown probe {config.probe!r}: choose one of {', '.join(PROBES)}")
    # Few labels: only the chosen training images go through the network (their own cache entry),
    # so a 1%-label probe on ImageNet does not extract 1.28M feature rows. The subset is drawn from
    # the labels alone, so it is the same whatever network is probed.
    train_images = splits.train
    train_split = "train"
    if config.labels_per_class is not None or config.label_fraction is not None:
        chosen = few_label_subset(
            train_images.labels, per_class=config.labels_per_class, fraction=config.label_fraction, seed=config.seed,
            class_names=train_images.class_names,
        )
        train_images = train_images.subset(chosen)
        train_split = f"train-{config.label_tag()}-seed{config.seed}"
    features = {
        name: extract_features(
            network,
            views,
            images,
            outputs,
            cache_dir=cache_dir,
            split=split,
            preprocessing_key=preprocessing_key,
            batch_size=config.batch_size,
            device=config.device,
            progress=progress,
        )
        for name, images, split in (
            ("train", train_images, train_split), ("val", splits.val, "val"), ("test", splits.test, "test")
        )
    }
    probe_config = config.probe_config()
    results = {}
    for output in outputs:
        train_set, val_set, test_set = (features[s][output] for s in ("train", "val", "test"))
        train = (train_set.features, train_set.labels)
        val, test = (val_set.features, val_set.labels), (test_set.features, test_set.labels)
        if isinstance(probe_config, LbfgsConfig):
            result = lbfgs_probe(train, val, test, num_classes=splits.num_classes, config=probe_config, progress=progress)
        else:
            checkpoint = None
            if probe_checkpoint_dir is not None:
                checkpoint = probe_checkpoint_dir / f"{_key(preprocessing_key, output, dataclasses.asdict(probe_config), config.label_tag(), config.seed)}.pt"
            result = sgd_probe(
                train, val, test, num_classes=splits.num_classes, config=probe_config, progress=progress,
                checkpoint_path=checkpoint,
            )
        record = result.to_dict()
        record.update(
            probe_config=dataclasses.asdict(probe_config),
            output=output,
            feature_dim=int(train_set.features.shape[1]),
            labels=config.label_tag(),
            train_images=int(len(train_set.labels)),
            val_images=int(len(val_set.labels)),
            test_images=int(len(test_set.labels)),
        )
        results[output] = record
    return results


def downstream_splits(run_config: Any, config: EvalConfig) -> DatasetSplits:
    """The downstream dataset: the run's own pretext dataset unless another is named."""
    dataset = config.dataset or run_config.dataset
    same = dataset == run_config.dataset and config.data_dir in (None, run_config.data_dir)
    return load_dataset(
        dataset,
        data_dir=config.data_dir if config.data_dir is not None else (run_config.data_dir if same else None),
        image_size=run_config.decode_size,
        val_size=config.val_size if config.val_size is not None else (run_config.val_size if same else None),
        limit=config.limit,
        test_limit=config.test_limit,
        seed=config.seed,
    )


def evaluate_run(run_dir: str | Path, config: EvalConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Probe a trained run's frozen network at ``config.outputs``; store and return the results."""
    from pretextlab.train import load_trained, resolve_device

    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    run_config, network, task = load_trained(run_dir, device)
    valid = tuple(network.output_names)
    outputs = valid if tuple(config.outputs) == ("all",) else tuple(config.outputs)
    unknown = [o for o in outputs if o not in valid]
    if unknown:
        raise PretextlabError(f"{run_config.network} has no output {', '.join(unknown)}: choose from {', '.join(valid)} or all")
    splits = downstream_splits(run_config, config)
    dataset = config.dataset or run_config.dataset
    key = _key(run_config.config_hash(), dataset, config.data_dir, config.val_size, config.limit, config.test_limit, config.seed, splits.describe())
    results = probe_representation(
        network, task.eval_views, splits, outputs, run_dir / FEATURES_DIR, key, config, progress=progress,
        probe_checkpoint_dir=run_dir / PROBES_DIR / "checkpoints",
    )
    # Two folder datasets (ImageNet, Places205) must not share result files: name them by folder.
    dataset_tag = dataset if dataset != "folder" else f"folder-{Path(config.data_dir or run_config.data_dir or 'data').name}"
    stored = []
    for output, record in results.items():
        record.update(
            run=str(run_dir),
            run_config_hash=run_config.config_hash(),
            task=run_config.task,
            network=run_config.network,
            width=run_config.width,
            dataset=dataset,
            eval_config=dataclasses.asdict(config),
            data=splits.describe(),
        )
        name = f"{dataset_tag}-{output}-{config.probe_tag()}-{config.label_tag()}.json"
        atomic.write_json(run_dir / PROBES_DIR / name, record)
        stored.append(record)
    return stored
