"""What every probe shares: input checks, standardisation, chunked scoring and the result type.

Every probe takes three splits, each (features float (N, D), labels int (N,)), where the features
may be a read-only ``np.memmap`` far larger than memory: everything here works on row chunks and
never writes to the caller's arrays.

Standardisation (train-split column mean and std, as the released evaluation code's linear
probes): a column constant on the training split carries no information a probe can learn, so it
is *zeroed* everywhere (scale 0), not divided by 1. Dividing by 1 would leave its val/test values
(which need not be constant) in the input, where they pass through weights the data never
trained: noise for an SGD probe's random initial weights, and roundoff times a possibly huge value
for L-BFGS. Zeroing makes the result exactly what it would be without that column.

A probe can also run data-parallel (``Shard``): each rank of an initialised process group holds
rows ``Shard.rows(N)`` of the training split, and every sum over rows (column moments, loss,
gradient, correct predictions) is all-reduced, so every rank computes what one process would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pretextlab.errors import PretextlabError
from pretextlab.evaluate.cache_files import Bfloat16Rows

CHUNK_ROWS = 8192  # rows per chunk when standardising or scoring, to bound temporary memory

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class ProbeResult:
    """One probe's outcome; accuracies in percent (0-100). ``chosen`` holds what was picked (the
    L2 strength) or fixed (the SGD schedule); ``seconds`` is the wall time spent on the probe."""

    probe: str
    val_top1_percent: float
    test_top1_percent: float
    chosen: dict[str, float]
    seconds: float
    train_size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def non_finite_error(name: str) -> PretextlabError:
    return PretextlabError(f"{name} features contain NaN or infinite values: fix the feature extraction (or drop those rows)")


def checked_split(split: Any, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One (features, labels) pair as arrays, or an error that says what is wrong with it."""
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise PretextlabError(f"{name} must be a pair (features (N, D), labels (N,)), got {type(split).__name__}")
    features, labels = split
    if not isinstance(features, (np.ndarray, Bfloat16Rows)):  # a memmap (or bfloat16 cache) stays one (no copy)
        features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise PretextlabError(f"{name} features must be 2-d (N, D), got shape {features.shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise PretextlabError(f"{name} features must be numbers (float32 preferred), got {features.dtype}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise PretextlabError(f"{name} has {len(features)} feature rows but labels of shape {labels.shape}: give one label per row")
    if len(features) == 0 or features.shape[1] == 0:
        raise PretextlabError(f"{name} is empty (features of shape {features.shape}): it needs at least one row and one dimension")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PretextlabError(f"{name} labels must be integers (class ids), got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PretextlabError(f"{name} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}: check num_classes")
    return features, labels.astype(np.int64, copy=False)


def checked_splits(train: Any, val: Any, test: Any, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three splits checked together: same feature size, every class present in train."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise PretextlabError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
    splits = {name: checked_split(split, name, num_classes) for name, split in (("train", train), ("val", val), ("test", test))}
    dims = {name: x.shape[1] for name, (x, _) in splits.items()}
    if len(set(dims.values())) != 1:
        raise PretextlabError(f"the splits have different feature sizes {dims}: they must come from the same output")
    missing = np.flatnonzero(np.bincount(splits["train"][1], minlength=num_classes) == 0)
    if len(missing):
        raise PretextlabError(
            f"class{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing[:10]))} "
            f"{'have' if len(missing) > 1 else 'has'} no training example: give at least one labelled image per class "
            f"(or lower num_classes)"
        )
    return splits


@dataclass(frozen=True)
class ProbeData:
    """What a probe is given: the splits it is fitted on (train), follows or chooses with (val) and
    is scored on (test), each (features float (N, D), labels int (N,)), and the number of classes.
    The one argument list of every precomputed-feature probe (lbfgs_probe, sgd_probe)."""

    train: Split
    val: Split
    test: Split
    num_classes: int

    def checked(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The three splits checked together (``checked_splits``), by name."""
        return checked_splits(self.train, self.val, self.test, self.num_classes)


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel probe: rank ``rank`` of ``world`` (1: the whole data,
    no communication). Every rank must make the same calls in the same order (collectives), which
    run on ``device`` (CUDA for NCCL, the CPU for gloo) whatever device a tensor lives on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def of_process_group(cls) -> "Shard":
        """The default process group's rank and size (torchrun's job, a study cell's DDP job)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise PretextlabError("a sharded probe needs an initialised process group (torch.distributed.init_process_group, e.g. under torchrun)")
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def rows(self, count: int) -> slice:
        """This rank's contiguous block of ``count`` rows (sizes differ by at most one)."""
        return slice(count * self.rank // self.world, count * (self.rank + 1) // self.world)

    def _collective(self, tensor: torch.Tensor, operation: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        if self.world == 1:
            return tensor
        if tensor.device == self.device:
            operation(tensor)
        else:
            moved = tensor.to(self.device)
            operation(moved)
            tensor.copy_(moved)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place."""
        return self._collective(tensor, dist.all_reduce)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place: one copy of what a single process decides."""
        return self._collective(tensor, lambda t: dist.broadcast(t, src=0))

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's picklable ``value`` on every rank (a plan, or an error all ranks must raise)."""
        if self.world == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]

    def barrier(self) -> None:
        """Every rank waits here until all have arrived (e.g. all rows of a file are written)."""
        self.sum_(torch.zeros(1, device=self.device))


SINGLE = Shard()


def check_finite(features: np.ndarray, name: str, shard: Shard = SINGLE) -> None:
    bad = any(not np.isfinite(features[start : start + CHUNK_ROWS]).all() for start in range(0, len(features), CHUNK_ROWS))
    # Every rank raises together (one rank raising alone would leave the others in a collective).
    if shard.sum_(torch.tensor([float(bad)], dtype=torch.float64)).item() > 0:
        raise non_finite_error(name)


def standardisation(features: np.ndarray, name: str, shard: Shard = SINGLE) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and 1/std in float64, by chunks (no float64 copy of the whole matrix); constant
    columns get 1/std = 0 (see the module doc). A NaN or inf anywhere makes the sums non-finite, so
    this is the finiteness check of the split too. With a ``shard``, ``features`` are this rank's
    rows and the sums and row count are all-reduced: the moments of the whole split."""
    dim = features.shape[1]
    sums = np.zeros(2 * dim + 1)  # column sums, column sums of squares, rows
    for start in range(0, len(features), CHUNK_ROWS):
        chunk = np.asarray(features[start : start + CHUNK_ROWS], dtype=np.float64)
        sums[:dim] += chunk.sum(0)
        sums[dim : 2 * dim] += np.square(chunk).sum(0)
    sums[-1] = len(features)
    sums = shard.sum_(torch.from_numpy(sums)).numpy()
    total, squares, count = sums[:dim], sums[dim : 2 * dim], sums[-1]
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise non_finite_error(name)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    constant = std < 1e-12 * np.maximum(1.0, np.abs(mean))
    inv_std = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
    return mean, inv_std


class Standardised:
    """One split as a probe reads it: standardised rows (float32 unless ``dtype`` says otherwise)
    on the device, either all held there (``resident``) or loaded per request from the caller's
    array (never written to)."""

    def __init__(
        self, features: np.ndarray, moments: tuple[np.ndarray, np.ndarray] | None, device: torch.device, resident: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.features = features
        self.device = device
        self.dtype = dtype
        self.mean = self.inv_std = None
        if moments is not None:
            self.mean = torch.from_numpy(moments[0]).to(device=device, dtype=dtype)
            self.inv_std = torch.from_numpy(moments[1]).to(device=device, dtype=dtype)
        self.whole: torch.Tensor | None = None
        if resident:
            whole = torch.empty(features.shape, dtype=dtype, device=device)
            for start in range(0, len(features), CHUNK_ROWS):
                whole[start : start + CHUNK_ROWS] = self.load(features[start : start + CHUNK_ROWS])
            self.whole = whole

    def __len__(self) -> int:
        return len(self.features)

    def load(self, rows: np.ndarray) -> torch.Tensor:
        # np.array copies, so the caller's (often read-only, memory-mapped) array is never touched.
        x = torch.from_numpy(np.array(rows, dtype=np.float32)).to(device=self.device, dtype=self.dtype)
        if self.mean is not None:
            x = x.sub_(self.mean).mul_(self.inv_std)
        return x

    def rows(self, order: torch.Tensor, order_on_device: torch.Tensor) -> torch.Tensor:
        """The rows ``order`` (a CPU index tensor; the same on the device): a minibatch."""
        if self.whole is not None:
            return self.whole.index_select(0, order_on_device)
        return self.load(self.features[order.numpy()])

    def chunks(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.features), CHUNK_ROWS):
            if self.whole is not None:
                yield self.whole[start : start + CHUNK_ROWS]
            else:
                yield self.load(self.features[start : start + CHUNK_ROWS])


def split_moments(features: np.ndarray, name: str, standardize: bool, shard: Shard = SINGLE) -> tuple[np.ndarray, np.ndarray] | None:
    """The train split's standardisation (None when off, after checking it is finite); with a
    ``shard``, ``features`` are this rank's rows of it."""
    if standardize:
        return standardisation(features, name, shard)
    check_finite(features, name, shard)
    return None


def accuracy_percent(
    logits_of: Callable[[torch.Tensor], torch.Tensor], split: Standardised, labels: np.ndarray | torch.Tensor, shard: Shard = SINGLE
) -> float:
    """Top-1 accuracy in percent of ``logits_of`` over ``split``, chunk by chunk, without gradients;
    with a ``shard``, ``split`` and ``labels`` are this rank's rows and the counts are all-reduced."""
    labels = torch.as_tensor(labels).to(split.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.device)
    start = 0
    with torch.no_grad():
        for chunk in split.chunks():
            correct += (logits_of(chunk).argmax(1) == labels[start : start + len(chunk)]).sum()
            start += len(chunk)
    counts = shard.sum_(torch.tensor([int(correct), len(labels)], dtype=torch.int64, device=split.device))
    return 100.0 * int(counts[0]) / int(counts[1])
