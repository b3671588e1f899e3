"""The downstream kNN monitor: weighted-kNN top-1 of the frozen network's features during pretext training.

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", sec. 3.4)
and solo-learn's ``weighted_knn`` (solo/utils/knn.py): cosine similarity to a labelled bank, the k
nearest neighbours vote for their class with weight exp(similarity / T), T = 0.07, at k = 20 and 200.
The bank is a class-balanced subset of the training split (its labels only: pretext training never
reads them), scored on a class-balanced subset of the held-out validation split. Features are the
probes' (evaluate/features.py: the task's eval views, the study's pooling rule, views averaged), taken
in eval mode without gradients, so neither BatchNorm's running statistics nor any random stream of
training moves: a run with the monitor ends with the weights of one without it (tests/test_knn_monitor.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretextlab.data import BatchLoader, DatasetSplits, ImageSet
from pretextlab.data.splits import balanced_subset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.features import forward_pooled
from pretextlab.evaluate.pooling import POOL_BUDGET

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07
# The bank is at most this share of the training split (never fewer images than classes), so on a
# small run the monitor stays a small share of an epoch (benchmarks/bench_monitor.py measures it).
MAX_BANK_SHARE = 0.1
# balanced_subset's purposes 1-4 draw the splits (data/splits.py); the monitor's draws are its own.
_PURPOSE_BANK, _PURPOSE_SCORED = 17, 18
_BATCH = 256  # images per forward pass of the monitor
_CHUNK = 512  # scored images per similarity block: (chunk x bank) floats at a time

Views = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def knn_field(output: str, k: int) -> str:
    """The metrics.jsonl field of the monitor's top-1 at ``output`` for ``k`` neighbours (percent)."""
    return f"knn_{output}_k{k}_top1_percent"


def parse_knn_field(name: str) -> tuple[str, int] | None:
    """(output, k) of a ``knn_field`` name; None for any other metric."""
    match = re.fullmatch(r"knn_(.+)_k(\d+)_top1_percent", name)
    return (match.group(1), int(match.group(2))) if match else None


def knn_text(fields: dict[str, float]) -> str:
    """The monitor's k=20 numbers for the epoch's line on stderr ("" when it did not run)."""
    parsed = [(parse_knn_field(name), value) for name, value in fields.items()]
    shown = [f"{key[0]} {value:.1f}%" for key, value in parsed if key is not None and key[1] == KNN_KS[0]]
    return f"; kNN top-1 (k={KNN_KS[0]}) {', '.join(shown)}" if shown else ""


def knn_series(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Each (output, k)'s (epoch, top-1 %) points in metrics.jsonl records (the figures' input)."""
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for record in records:
        for name, value in record.items():
            key = parse_knn_field(name)
            if key is not None and isinstance(value, (int, float)) and record.get("epoch") is not None:
                series.setdefault(key, []).append((float(record["epoch"]), float(value)))
    return series


def weighted_knn_top1(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
    num_classes: int, ks: Sequence[int] = KNN_KS, temperature: float = KNN_TEMPERATURE,
) -> dict[int, float]:
    """Top-1 accuracy (%) of the weighted kNN classifier for each k (k above the bank's size: the whole bank).

    Computed in the features' dtype (float64 in, float64 throughout); ties in the vote go to the lower
    class id (``argmax``), as solo-learn's ``sort(descending)`` keeps the first of equal scores.
    """
    if len(bank) == 0 or len(queries) == 0:
        raise PretextlabError("the kNN monitor needs at least one labelled and one scored image")
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    widest = min(max(ks), len(bank))
    right = dict.fromkeys(ks, 0)
    for start in range(0, len(queries), _CHUNK):
        block = queries[start : start + _CHUNK]
        similarity, nearest = (block @ bank.T).topk(widest, dim=1)  # sorted, most similar first
        weights = (similarity / temperature).exp()
        votes_for = bank_labels[nearest]
        truth = query_labels[start : start + _CHUNK]
        for k in ks:
            kept = min(k, widest)
            votes = torch.zeros(len(block), num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, votes_for[:, :kept], weights[:, :kept])
            right[k] += int((votes.argmax(dim=1) == truth).sum())
    return {k: 100.0 * right[k] / len(queries) for k in ks}


@dataclass
class MonitorSets:
    """The labelled bank (from the training split) and the scored images (from the held-out split)."""

    bank: ImageSet
    scored: ImageSet
    num_classes: int


def monitor_sets(splits: DatasetSplits, labels: int, scored: int, seed: int) -> MonitorSets:
    """Class-balanced, fixed for the run (a function of the seed only): the same images every time."""
    train, val = splits.train, splits.val
    bank_size = min(labels, len(train), max(train.num_classes, int(MAX_BANK_SHARE * len(train))))
    scored_size = min(scored, len(val))
    if bank_size < 1 or scored_size < 1:
        raise PretextlabError(
            f"the kNN monitor needs labelled training images and held-out images (got {len(train)} and {len(val)}): "
            "raise --limit / --val-size, or turn it off with --monitor-every 0"
        )
    return MonitorSets(
        bank=train.subset(balanced_subset(train.labels, bank_size, seed, _PURPOSE_BANK)),
        scored=val.subset(balanced_subset(val.labels, scored_size, seed, _PURPOSE_SCORED)),
        num_classes=train.num_classes,
    )


def build_monitor(config: Any, network: nn.Module, splits: DatasetSplits, device: torch.device, main: bool) -> "KnnMonitor | None":
    """The run's monitor (a resolved TrainConfig's monitor_* options): None when off or on a rank other than 0.
    The outputs are checked on every rank, so a wrong name is one clear error everywhere."""
    if config.monitor_every == 0:
        return None
    check_monitor_outputs(config.monitor_outputs, getattr(network, "output_names", config.monitor_outputs))
    if not main:
        return None
    sets = monitor_sets(splits, config.monitor_labels, config.monitor_images, config.seed)
    return KnnMonitor(sets, config.monitor_outputs, device, config.workers)


def check_monitor_outputs(outputs: Sequence[str], known: Sequence[str]) -> None:
    unknown = [o for o in outputs if o not in known]
    if unknown or not outputs:
        raise PretextlabError(
            f"--monitor-outputs {','.join(outputs) or '(none)'}: the network has no output {', '.join(unknown) or '(none named)'}; "
            f"choose from {', '.join(known)} (or --monitor-every 0 to turn the monitor off)"
        )


class KnnMonitor:
    """Measures the weighted-kNN top-1 of the current weights at each named output (rank 0 only)."""

    def __init__(self, sets: MonitorSets, outputs: Sequence[str], device: torch.device, workers: int = 0) -> None:
        self.sets, self.outputs, self.device, self.workers = sets, tuple(outputs), device, workers

    def _features(self, network: nn.Module, views: Views, images: ImageSet) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts: dict[str, list[np.ndarray]] = {o: [] for o in self.outputs}
        labels = []
        # shuffle=False: the loader draws no random numbers (data/loader.py's BatchOrder).
        for batch in BatchLoader(images, _BATCH, shuffle=False, workers=self.workers):
            if len(batch.labels):
                pooled = forward_pooled(network, views, batch.images, self.outputs, self.device, POOL_BUDGET)
                for output in self.outputs:
                    parts[output].append(pooled[output])
                labels.append(batch.labels)
        if not labels:
            raise PretextlabError("no image of the kNN monitor's sets could be decoded: check the image files")
        # float64 for the vote: the features are float32, the similarities and weights need not add roundoff.
        features = {o: torch.from_numpy(np.concatenate(parts[o])).double() for o in self.outputs}
        return features, torch.cat(labels)

    def measure(self, network: nn.Module, eval_views: Views, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """``{knn_<output>_k<k>_top1_percent: value}`` of the task's ``eval_views`` fed in the network's
        ``dtype``; the network's train/eval mode is restored."""

        def views(images: torch.Tensor) -> tuple[torch.Tensor, int]:
            inputs, count = eval_views(images)
            return inputs.to(dtype), count

        was_training = network.training
        network.eval()
        try:
            bank, bank_labels = self._features(network, views, self.sets.bank)
            scored, scored_labels = self._features(network, views, self.sets.scored)
        finally:
            network.train(was_training)
        record = {}
        for output in self.outputs:
            top1 = weighted_knn_top1(bank[output], bank_labels, scored[output], scored_labels, self.sets.num_classes)
            record.update({knn_field(output, k): value for k, value in top1.items()})
        return record
