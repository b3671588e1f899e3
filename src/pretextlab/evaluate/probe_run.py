"""Evaluate a frozen representation: extract (cached) features at named outputs, fit a probe.

This is the glue between a trained run, a downstream dataset and the probes. Every result is
stored as JSON in the run directory with its full recipe (run, output, probe, labels, dataset,
split sizes, regularisation chosen) and the checkpoint it came from (step, SHA-256 of the file,
whether training had finished), so every number can be traced back to what produced it.

Nothing derived from one checkpoint is reused for another (the project's contract: every number
traces back to the checkpoint it came from): the feature cache key holds the checkpoint's step and content hash, so a run trained further gets its
features extracted again. A result's file name ends in a short hash of everything that changes
the number (checkpoint, dataset and its split sizes, seed, labels, the probe's full recipe), so
evaluations that differ in any of these are all kept side by side. Accuracies are in percent.

SGD-trained probes follow a named recipe (``sgd_preset``, see ``sgd_config``): "paper" (the
released one, recomputing features from random crops every epoch: ``augmented``; trained on
train + held-out, followed and scored on the test split) or "precomputed" (cached central-crop
features, standardised, train minus held-out). Unset, it is "paper" for folder datasets (ImageNet,
Places205) and "precomputed" for Fashion-MNIST; the resolved name is in every result's recipe
(hence its file's hash) and record (``sgd_preset``, ``train_split``, ``val_split``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pretextlab.data import DatasetSplits, few_label_subset, label_budget_tag, load_dataset
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.augmented import TrainViews, augmented_sgd_probe, augmented_views, whole_training_split
from pretextlab.evaluate.cache_files import FEATURE_DTYPES
from pretextlab.evaluate.common import SINGLE, ProbeData, Shard
from pretextlab.evaluate.distributed_probe import process_shard
from pretextlab.evaluate.features import extract_features
from pretextlab.evaluate.lbfgs import LbfgsConfig, fit_lbfgs_probe
from pretextlab.evaluate.result_files import content_key as _key
from pretextlab.evaluate.result_files import dataset_tag, store_results
from pretextlab.evaluate.sharded_features import extract_features_sharded
from pretextlab.evaluate.sgd import SgdConfig, sgd_probe
from pretextlab.evaluate.sgd_config import PRESETS as SGD_PRESETS
from pretextlab.evaluate.sgd_config import SCHEDULES as SGD_SCHEDULES
from pretextlab.options import check_instance, option

PROBES = ("lbfgs", "sgd", "mlp")
PROBES_DIR = "probes"
FEATURES_DIR = "features"
# Under these counts a top-1 accuracy says little (one image moves it by a point or more, a class
# with a handful of images by far more): the result is kept but flagged, on stderr and in its JSON.
MIN_SCORED_IMAGES = 100
MIN_SCORED_PER_CLASS = 10
# Settings that change how fast, not what, a probe computes: left out of the recipe hash.
NOT_IN_RECIPE = ("device", "resident")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


@dataclass
class EvalConfig:
    """What to probe and how; the run itself is named separately."""

    # Each field is an `evaluate` flag (cli.py generates them with options.add_arguments).
    outputs: tuple[str, ...] = option(
        ("pre_logits",), "named outputs to probe (block1..., pre_logits), or all", flag="--output", nargs="+",
        metavar="OUTPUT", section="probe")
    probe: str = option("lbfgs", "lbfgs (full-batch logistic regression, L2 picked on val), sgd (linear) or mlp",
                        choices=PROBES, section="probe")
    dataset: str | None = option(None, "downstream dataset, fashion-mnist or folder (default: the run's own)",
                                 metavar="NAME", section="data")
    data_dir: str | None = option(None, "where the downstream dataset lives (default: the run's own)",
                                  metavar="DIR", section="data")
    val_size: float | None = option(
        None, "held-out validation images that pick L2: a count, or a fraction < 1 (default: the run's)",
        metavar="N", section="data")
    limit: int | None = option(None, "class-balanced subset of N downstream training images (default: all)",
                               metavar="N", section="data")
    test_limit: int | None = option(
        None, "class-balanced subset of N test images; under 100, or 10 per class, is flagged (default: all)",
        metavar="N", section="data")
    labels_per_class: int | None = option(None, "few labels: N labelled images per class (default: all labels)",
                                          metavar="N", section="data")
    label_fraction: float | None = option(None, "few labels: this fraction of the labels (default: all labels)",
                                          metavar="F", section="data")
    batch_size: int = option(256, "feature extraction batch", metavar="N", section="runtime")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N", section="runtime")
    # How fast, not what: not in the recipe.
    workers: int = option(
        0, "processes decoding image files (folder datasets): for extraction and each epoch of --sgd-preset paper",
        metavar="N", section="runtime")
    seed: int = option(0, "splits, few-label subsets and SGD probes", section="runtime")
    l2_grid: tuple[float, ...] | None = option(
        None, "lbfgs: the L2 strengths tried, the best on val kept (default: the probe's own grid)", nargs="+",
        metavar="L2", section="probe")
    # SGD-trained probes ("sgd" linear, "mlp"): the study's schedule, optionally shortened in proportion.
    sgd_schedule: str = option("paper", "sgd/mlp: the study's 70-epoch (batch 512) or 520-epoch (batch 2048) schedule",
                               choices=SGD_SCHEDULES, section="probe")
    sgd_epochs: int | None = option(
        None, "sgd/mlp: shorten the schedule to N epochs, same proportions (default: the schedule's own)",
        metavar="N", section="probe")
    sgd_batch_size: int | None = option(
        None, "sgd/mlp: images per step (default: the schedule's, 512 or 2048)", metavar="N", section="probe")
    sgd_base_lr: float | None = option(
        None, "sgd/mlp: learning rate at a batch of 256 (default: the preset's)", metavar="LR", section="probe")
    # evaluate_run resolves None with the run's dataset when ``dataset`` is None.
    sgd_preset: str | None = option(
        None, "sgd/mlp: paper (the released recipe: features recomputed from random crops every epoch, raw, "
        "whole training split, scored on the test split) or precomputed (cached central-crop features, "
        "standardised, train minus the held-out split; fast) (default: paper for folder, precomputed otherwise)",
        choices=SGD_PRESETS, section="probe")
    feature_dtype: str = option(
        "float32", "how the feature cache stores features: float32, or bfloat16 / float16 in half the bytes (probes "
        "compute in float32 on what they read)", choices=FEATURE_DTYPES, section="probe")

    def resolved_sgd_preset(self) -> str:
        if self.sgd_preset is not None:
            if self.sgd_preset not in SGD_PRESETS:
                raise PretextlabError(f"unknown --sgd-preset {self.sgd_preset!r}: choose one of {', '.join(SGD_PRESETS)}")
            return self.sgd_preset
        return "paper" if self.dataset == "folder" else "precomputed"

    def probe_config(self) -> LbfgsConfig | SgdConfig:
        """The probe's own config, fully resolved (stored with every result)."""
        if self.probe == "lbfgs":
            lbfgs = LbfgsConfig(device=self.device)
            return dataclasses.replace(lbfgs, l2_grid=tuple(self.l2_grid)) if self.l2_grid is not None else lbfgs
        if self.sgd_schedule not in SGD_SCHEDULES:
            raise PretextlabError(f"unknown SGD schedule {self.sgd_schedule!r}: choose one of {', '.join(SGD_SCHEDULES)}")
        kind = "linear" if self.probe == "sgd" else "mlp"
        sgd = SgdConfig.preset(self.resolved_sgd_preset(), kind, self.sgd_schedule, device=self.device, seed=self.seed)
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
        # The precomputed recipe keeps the names results had before the presets; the released one
        # says that its features were recomputed from random crops.
        recipe = "augmented-" if probe_config.features == "augmented" else ""
        return f"{self.probe}-{recipe}{self.sgd_schedule}{probe_config.epochs}"

    def recipe(self) -> dict[str, Any]:
        """Everything in this config that changes a result (not the device or the extraction batch).

        In canonical form: ``EvalConfig(val_size=100)`` and ``--val-size 100`` name one result."""
        c = check_instance(self)
        probe = {k: v for k, v in dataclasses.asdict(c.probe_config()).items() if k not in NOT_IN_RECIPE}
        # The SGD recipe by name too (its fields are in probe_config): L-BFGS records keep their hashes.
        preset = {} if c.probe == "lbfgs" else {"sgd_preset": c.resolved_sgd_preset()}
        return {
            "probe": c.probe, "probe_config": probe, **preset, "dataset": c.dataset, "data_dir": c.data_dir,
            "val_size": c.val_size, "limit": c.limit, "test_limit": c.test_limit,
            "labels_per_class": c.labels_per_class, "label_fraction": c.label_fraction, "seed": c.seed,
            # Rounded features change the number; float32 records keep their hashes.
            **({"feature_dtype": c.feature_dtype} if c.feature_dtype != "float32" else {}),
        }

    def label_tag(self) -> str:
        return label_budget_tag(self.labels_per_class, self.label_fraction)


class PixelNetwork(nn.Module):
    """The raw-pixel baseline as a 'network' with one named output."""

    output_names = ("pixels",)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": x.flatten(1)}


def scoring_warnings(split: str, labels: np.ndarray, num_classes: int) -> list[str]:
    """Why an accuracy measured on these labels is not meaningful (empty list: it is)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    problems = []
    if len(labels) < MIN_SCORED_IMAGES:
        problems.append(f"only {len(labels)} {split} images (fewer than {MIN_SCORED_IMAGES})")
    if counts.min() < MIN_SCORED_PER_CLASS:
        problems.append(f"a class with only {counts.min()} {split} images (fewer than {MIN_SCORED_PER_CLASS} per class)")
    if not problems:
        return []
    flag = "--test-limit" if split == "test" else "--val-size"
    return [f"{' and '.join(problems)}: its top-1 accuracy is not meaningful; raise {flag} or use a larger dataset"]


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
    log: Log = _stderr,
    train_views: TrainViews | None = None,
    shard: Shard = SINGLE,
) -> dict[str, dict[str, Any]]:
    """Features of every split at ``outputs`` (one pass per split, cached), then one probe per output.

    Each record carries ``warnings`` (also passed to ``log``) when its val or test split is too
    small for its accuracy to mean much (``MIN_SCORED_IMAGES``, ``MIN_SCORED_PER_CLASS``).
    An SGD recipe with ``features="augmented"`` trains from ``train_views(uint8 batch, generator)``
    (``augmented.augmented_views`` of the run's task) instead of cached training features.
    With a ``shard`` of world > 1 (every rank of a process group calls this alike) the ranks extract
    the features together and fit the L-BFGS probe data-parallel (``distributed_probe``).
    """
    if config.probe not in PROBES:
        raise PretextlabError(f"unknown probe {config.probe!r}: choose one of {', '.join(PROBES)}")
    if shard.world > 1 and config.probe != "lbfgs":
        raise PretextlabError(f"--probe {config.probe} runs in one process: launch it without torchrun (only lbfgs is data-parallel)")
    if config.feature_dtype != "float32":  # features rounded otherwise are cached apart
        preprocessing_key = f"{preprocessing_key}-{config.feature_dtype}"
    extract = functools.partial(extract_features_sharded, shard=shard) if shard.world > 1 else extract_features
    probe_config = config.probe_config()
    sgd = probe_config if isinstance(probe_config, SgdConfig) else None
    # The released probe trains on "trainval" (train + held-out) and follows and scores "test"
    # (released code, config/evaluation/rotation_or_exemplar.sh:26-27).
    whole = sgd is not None and sgd.train_split == "whole"
    augmented = sgd is not None and sgd.features == "augmented"
    if augmented and train_views is None:
        raise PretextlabError("the 'paper' SGD preset recomputes features from random crops: it needs train_views (evaluate_run gives the task's)")
    # Few labels: only the chosen training images go through the network (their own cache entry),
    # so a 1%-label probe on ImageNet does not extract 1.28M feature rows. The subset is drawn from
    # the labels alone, so it is the same whatever network is probed.
    train_images = whole_training_split(splits.train, splits.val) if whole else splits.train
    train_split = "trainval" if whole else "train"
    followed_images, followed_split = (splits.test, "test") if whole else (splits.val, "val")
    if config.labels_per_class is not None or config.label_fraction is not None:
        chosen = few_label_subset(
            train_images.labels, per_class=config.labels_per_class, fraction=config.label_fraction, seed=config.seed,
            class_names=train_images.class_names,
        )
        train_images = train_images.subset(chosen)
        train_split = f"{train_split}-{config.label_tag()}-seed{config.seed}"
    wanted = [("train", train_images, train_split)] if not augmented else []
    wanted += [("val", followed_images, followed_split)] if not whole else []
    wanted += [("test", splits.test, "test")]
    features = {
        name: extract(
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
            workers=config.workers,
            feature_dtype=config.feature_dtype,
        )
        for name, images, split in wanted
    }
    if whole:
        features["val"] = features["test"]
    too_few = [] if whole else scoring_warnings("val", splits.val.labels, splits.num_classes)
    too_few += scoring_warnings("test", splits.test.labels, splits.num_classes)
    for warning in too_few:
        log(f"warning: {warning}")
    on_the_fly = {}
    if augmented:
        checkpoint = None
        if probe_checkpoint_dir is not None:
            checkpoint = probe_checkpoint_dir / f"{_key(preprocessing_key, list(outputs), dataclasses.asdict(probe_config), config.label_tag(), config.seed)}.pt"
        split_pair = {s: {o: (features[s][o].features, features[s][o].labels) for o in outputs} for s in ("val", "test")}
        on_the_fly = augmented_sgd_probe(
            network, train_views, train_images, split_pair["val"], split_pair["test"], outputs, splits.num_classes,
            probe_config, network_key=preprocessing_key, checkpoint_path=checkpoint, progress=progress,
            workers=config.workers,
        )
    results = {}
    for output in outputs:
        val_set, test_set = (features[s][output] for s in ("val", "test"))
        train_set = features["train"][output] if not augmented else None
        val, test = (val_set.features, val_set.labels), (test_set.features, test_set.labels)
        if augmented:
            result = on_the_fly[output]
        else:
            data = ProbeData((train_set.features, train_set.labels), val, test, splits.num_classes)
            if isinstance(probe_config, LbfgsConfig):
                result = fit_lbfgs_probe(data, probe_config, progress=progress, label=output, shard=shard)[0]
            else:
                checkpoint = None
                if probe_checkpoint_dir is not None:
                    checkpoint = probe_checkpoint_dir / f"{_key(preprocessing_key, output, dataclasses.asdict(probe_config), config.label_tag(), config.seed)}.pt"
                result = sgd_probe(data, config=probe_config, progress=progress, checkpoint_path=checkpoint, label=output)
        record = result.to_dict()
        record.update(
            probe_config=dataclasses.asdict(probe_config),
            output=output,
            feature_dim=int(val_set.features.shape[1]),
            labels=config.label_tag(),
            train_images=int(len(train_images)),
            val_images=int(len(val_set.labels)),
            test_images=int(len(test_set.labels)),
            warnings=list(too_few),
        )
        if sgd is not None:
            # Which recipe made this number: the preset's name and the splits it trained on and followed.
            record.update(sgd_preset=config.resolved_sgd_preset(), train_split=sgd.train_split, val_split=followed_split)
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


def evaluate_run(run_dir: str | Path, config: EvalConfig, progress: bool = True, log: Log = _stderr) -> list[dict[str, Any]]:
    """Probe a trained run's frozen network at ``config.outputs``; store and return the results.

    Each record says which checkpoint was probed (``checkpoint``: step, sha256, total_steps,
    finished) and where it was stored (``result_file``); probing an unfinished run is allowed (a
    curve over training needs it) but said on ``log``.
    """
    from pretextlab.training import load_trained_identity

    run_dir = Path(run_dir)
    config = check_instance(config)  # canonical values: the cache key and the result name agree whatever the caller typed
    # Under torchrun (or in a DDP job) every rank probes its share; rank 0 alone logs and stores.
    shard = process_shard(config.device)
    log = log if shard.rank == 0 else (lambda message: None)
    device = resolve_device(config.device)
    run_config, network, task, identity = load_trained_identity(run_dir, device)
    checkpoint = {"step": identity.step, "sha256": identity.sha256, "total_steps": identity.total_steps, "finished": identity.finished}
    if not identity.finished:
        of = f" of {identity.total_steps}" if identity.total_steps else ""
        log(f"warning: {run_dir} has not finished training: probing its checkpoint at step {identity.step}{of}")
    valid = tuple(network.output_names)
    outputs = valid if tuple(config.outputs) == ("all",) else tuple(config.outputs)
    unknown = [o for o in outputs if o not in valid]
    if unknown:
        raise PretextlabError(f"{run_config.network} has no output {', '.join(unknown)}: choose from {', '.join(valid)} or all")
    dataset = config.dataset or run_config.dataset
    if config.probe != "lbfgs" and config.sgd_preset is None:
        config = dataclasses.replace(config, sgd_preset="paper" if dataset == "folder" else "precomputed")
    splits = downstream_splits(run_config, config)
    # The checkpoint's step and content hash are part of the key: features of older weights are never reused.
    key = _key(
        run_config.config_hash(), identity.step, identity.sha256, dataset, config.data_dir, config.val_size,
        config.limit, config.test_limit, config.seed, splits.describe(),
    )
    results = probe_representation(
        network, task.eval_views, splits, outputs, run_dir / FEATURES_DIR, key, config, progress=progress,
        probe_checkpoint_dir=run_dir / PROBES_DIR / "checkpoints", log=log,
        train_views=functools.partial(augmented_views, task), shard=shard,
    )
    if shard.rank != 0:
        return []
    fields = dict(run=str(run_dir), run_config_hash=run_config.config_hash(), task=run_config.task,
                  network=run_config.network, width=run_config.width, dataset=dataset)
    tag = dataset_tag(dataset, config.data_dir or run_config.data_dir)
    return store_results(results, run_dir / PROBES_DIR, tag, config, checkpoint, splits, fields, log)
