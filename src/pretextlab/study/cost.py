"""What a study's grid costs on GPUs (docs/scale.md): per cell GPU-hours, checkpoint and feature-cache
bytes and probe memory per rank, from measured inputs (benchmarks/bench_cost_inputs.py's JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.lbfgs import EIGH_FLOAT64_MAX_DIM, LbfgsConfig
from pretextlab.evaluate.pooling import pooled_dim
from pretextlab.study.grid import Cell
from pretextlab.study.model import Study

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
COST_INPUTS = RESULTS / "cost_inputs.json"
DEVICE_CHECK = RESULTS / "device_check.json"
REFERENCE_NETWORK = {"network": "resnet50v1", "width": 4}  # torchvision's resnet50 shapes (README)
FEATURE_BYTES = 4  # the feature cache is float32 (evaluate/features.py)
GPUS_PER_NODE = 8
HOURS_PER_WEEK = 168
MLP_HIDDEN = 1000  # the study's MLP probe (evaluate/sgd_config.py)
SGD_SCHEDULE_EPOCHS = {"paper": 70, "paper_long": 520}  # the study's SGD schedules (evaluate/sgd_config.py)
EIGH_FLOPS_PER_DIM3 = 9  # a symmetric eigendecomposition's usual count, ~9 d^3 (Golub & Van Loan)
# A thin SVD of an n x d matrix (n < d) with both singular-vector sets, by R-SVD: ~6 d n^2 + 20 n^3
# (Golub & Van Loan, "Matrix Computations", the SVD algorithms' work table).
THIN_SVD_FLOPS = (6, 20)


@dataclass(frozen=True)
class DatasetSize:
    train_pool: int  # official training split (train + held-out val are cut from it)
    test: int  # official validation split, the study's test set
    classes: int
    source: str


# Split sizes of the datasets the study names, used when a folder is not on this machine to count.
KNOWN_DATASETS = {
    "imagenet": DatasetSize(1_281_167, 50_000, 1000, "ILSVRC-2012 (Russakovsky et al. 2015)"),
    "places205": DatasetSize(2_448_873, 20_500, 205, "Places205 (Zhou et al. 2014)"),
    "fashion-mnist": DatasetSize(60_000, 10_000, 10, "Fashion-MNIST (Xiao et al. 2017)"),
}


@dataclass(frozen=True)
class ReferenceGpu:
    """A cited, named throughput that turns FLOPs into seconds when no device was measured."""

    name: str
    images_per_s: float  # ResNet-50 training, mixed precision, per GPU of an 8-GPU node
    fp32_peak_flops_per_s: float
    probe_utilisation: float  # of the fp32 peak reached by the probe's large matmuls (an assumption)
    source: str


# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
# performance: NVIDIA DGX A100 (8x A100 80GB)": 16,621 img/s on 8 GPUs with mixed precision (pytorch-21.03
# container); fp32 peak 19.5 TFLOPS from NVIDIA's A100 datasheet.
A100 = ReferenceGpu("A100 80GB (DGX A100)", 16_621 / 8, 19.5e12, 0.7,
                    "NVIDIA DeepLearningExamples ResNet50 v1.5 PyTorch README (DGX A100, 8 GPUs, AMP: 16,621 img/s); "
                    "A100 datasheet fp32 peak 19.5 TFLOPS")


def workload_key(config: TrainConfig) -> str:
    """What a cell's FLOPs, parameters and feature shapes depend on: its network, width and sizes and the
    task's own whole-number / named options (patch size, copies, head sizes); not seeds or probabilities."""
    from pretextlab.tasks import task_class
    from pretextlab.tasks.base import own_fields

    values: dict[str, Any] = {name: getattr(config, name) for name in (
        "task", "network", "width", "representation_size", "image_size", "decode_size", "crop_source", "reversible_backward")}
    for f in own_fields(task_class(config.task).options_class):
        value = getattr(config, f.name, None)
        if isinstance(value, (int, str)) or value is None:
            values[f.name] = value
    return json.dumps(values, sort_keys=True)


def load_inputs(path: Path | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else COST_INPUTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PretextlabError(f"no cost inputs at {path}: run benchmarks/bench_cost_inputs.py --study FILE") from None
    except (OSError, ValueError) as error:
        raise PretextlabError(f"cannot read the cost inputs {path}: {error}; rerun benchmarks/bench_cost_inputs.py") from None


@dataclass(frozen=True)
class Throughput:
    train_flops_per_s: float  # one GPU: the training step's (and extraction's) counted FLOPs per second
    probe_flops_per_s: float  # one GPU: the L-BFGS probe's float32 matmuls
    source: str


def throughputs(inputs: dict[str, Any], device_check: Path | None) -> tuple[Throughput, dict[tuple[str, int], Throughput]]:
    """The cited reference throughput, and per (network, width) the measured one where device_check.json has it."""
    reference = inputs["workloads"][inputs["reference_workload"]]
    per_input = (reference["train_flops_per_image"] - reference["train_head_flops_per_image"]) / reference["train_inputs_per_image"]
    cited = Throughput(A100.images_per_s * per_input, A100.fp32_peak_flops_per_s * A100.probe_utilisation, f"cited: {A100.name}")
    measured: dict[tuple[str, int], Throughput] = {}
    path = DEVICE_CHECK if device_check is None else Path(device_check)
    if not path.exists():
        return cited, measured
    check = json.loads(path.read_text())
    if check.get("dry_run"):
        return cited, measured  # a CPU dry run's figures say nothing about a GPU
    probe = check.get("lbfgs", {}).get("gpu_flops_per_s") or cited.probe_flops_per_s
    rates: dict[tuple[str, int], list[float]] = {}
    for row in check.get("training", []):
        if row.get("task_flops_per_s") and not row.get("compile"):
            rates.setdefault((row["network"], row["width"]), []).append(row["task_flops_per_s"])
    for key, values in rates.items():
        measured[key] = Throughput(sum(values) / len(values), probe, f"measured: {check.get('device', 'GPU')}")
    return cited, measured


def split_sizes(dataset: str, data_dir: str | None, limit: int | None, val_size: float | None,
                test_limit: int | None, name: str) -> tuple[int, int, int, int, str]:
    """(train, val, test, classes, source) as data.load_dataset cuts them (limit, then val_size held out)."""
    key = dataset if dataset != "folder" else Path(data_dir or "").name.lower()
    size = KNOWN_DATASETS.get(key) or KNOWN_DATASETS.get(name.lower())
    if size is None:
        raise PretextlabError(
            f"the cost model does not know the size of dataset {name!r} ({dataset} {data_dir or ''}); "
            f"name it one of {', '.join(KNOWN_DATASETS)} or give its split sizes a limit:")
    pool = min(limit, size.train_pool) if limit else size.train_pool
    if val_size is None:
        val = 50_000 if pool >= 500_000 else round(0.1 * pool)  # data.load_dataset's default
    else:
        val = int(val_size) if val_size >= 1 else round(val_size * pool)
    test = min(test_limit, size.test) if test_limit else size.test
    return pool - val, val, test, size.classes, size.source


@dataclass
class CellCost:
    cell: str
    config_hash: str
    train_images_seen: int
    train_gpu_hours: float
    probe_gpu_hours: float
    gpu_hours: float
    checkpoint_bytes: int
    feature_cache_bytes: int
    probe_memory_per_rank_bytes: int
    throughput: str


def whitens_from_rows(rows: int, dim: int, ranks: int) -> bool:
    """Whether the probe whitens from the N x N side (a thin SVD of the features) rather than the
    D x D second moment: in one process with fewer rows than features (evaluate/lbfgs.py Whitening.of)."""
    return ranks == 1 and rows < dim


def lbfgs_flops(rows: int, other_rows: int, dim: int, classes: int, grid: int, evals_per_l2: float, ranks: int = 1) -> float:
    """One L-BFGS probe: whitening (second moment and eigendecomposition, or a thin SVD for few rows
    in one process), then per function evaluation logits and gradient (2 x 2 n d C), scoring val/test
    per L2 value (evaluate/lbfgs.py)."""
    if whitens_from_rows(rows, dim, ranks):
        setup = THIN_SVD_FLOPS[0] * dim * rows**2 + THIN_SVD_FLOPS[1] * rows**3
    else:
        setup = 2 * rows * dim * dim + EIGH_FLOPS_PER_DIM3 * dim**3
    return setup + grid * (evals_per_l2 * 4 * rows * dim * classes + 2 * other_rows * dim * classes)


def lbfgs_memory_per_rank(rows: int, dim: int, classes: int, ranks: int) -> int:
    """Bytes one rank holds: its share of the standardised features and of the logits, softmax and
    their gradient; the whitening's D x D second moment and eigenvectors, or for few rows in one
    process the thin SVD's copy of the features, N x N and N x D factors (float64 up to
    EIGH_FLOAT64_MAX_DIM); the weights, gradient and L-BFGS's history of 2 x history_size vectors."""
    shard = math.ceil(rows / ranks)
    vectors = 2 * LbfgsConfig().history_size + 4
    if whitens_from_rows(rows, dim, ranks):
        whitening = (2 * rows * dim + rows * rows) * (8 if rows <= EIGH_FLOAT64_MAX_DIM else 4)
    else:
        whitening = 2 * dim * dim * (8 if dim <= EIGH_FLOAT64_MAX_DIM else 4)
    return shard * dim * 4 + 3 * shard * classes * 4 + whitening + vectors * (dim + 1) * classes * 4


def cell_cost(study: Study, cell: Cell, inputs: dict[str, Any], throughput: Throughput, ranks: int) -> CellCost:
    key = workload_key(cell.config)
    workload = inputs["workloads"].get(key)
    if workload is None:
        raise PretextlabError(
            f"the cost inputs have no measurement for {cell.label} ({key}): run benchmarks/bench_cost_inputs.py "
            f"--study {study.path or 'FILE'} --out FILE and pass --cost-inputs FILE")
    c = cell.config
    train, _, _, _, _ = split_sizes(c.dataset, c.data_dir, c.limit, c.val_size, None, c.dataset)
    images_seen = round(train * c.epochs)
    train_seconds = images_seen * workload["train_flops_per_image"] / throughput.train_flops_per_s
    evals = inputs["lbfgs"]["mean_function_evals_per_l2"]
    probe_flops = 0.0
    extract_flops = 0.0
    cache = 0
    memory = 0
    extracted: set[str] = set()
    cached: set[tuple[str, str, str]] = set()
    for job in cell.plan:
        d = study.downstream[job.dataset]
        rows, val, test, classes, _ = split_sizes(d.dataset, d.data_dir, d.limit, d.val_size, d.test_limit, d.name)
        if job.labels.per_class is not None:
            rows = min(rows, job.labels.per_class * classes)
        elif job.labels.fraction is not None:
            rows = round(job.labels.fraction * rows)
        dim = pooled_dim(workload["output_shapes_per_view"][job.output])
        forward = workload["eval_forward_flops_per_image"]
        epochs = _sgd_epochs(job.sgd)
        recomputed = job.probe != "lbfgs" and (job.preset or _default_preset(d.dataset)) == "paper"
        if recomputed:
            # The released recipe: the frozen network runs on fresh crops of the whole training split every epoch.
            extract_flops += epochs * (rows + val) * forward + test * forward
            continue
        split_key = f"{job.dataset}/{job.labels.tag}"
        if split_key not in extracted:
            # One forward pass serves every output of a split; val and test are shared by label budgets.
            shared = f"{job.dataset}/shared"
            extract_flops += rows * forward + (0 if shared in extracted else (val + test) * forward)
            extracted.update({split_key, shared})
        if (job.dataset, job.output, job.labels.tag) not in cached:  # one cache file per output and split
            cached.add((job.dataset, job.output, job.labels.tag))
            cache += (rows + (val + test if job.labels.tag == "all" else 0)) * dim * FEATURE_BYTES
        if job.probe == "lbfgs":
            grid = len(job.l2_grid or LbfgsConfig().l2_grid)
            probe_flops += lbfgs_flops(rows, val + test, dim, classes, grid, evals, ranks)
            memory = max(memory, lbfgs_memory_per_rank(rows, dim, classes, ranks))
        else:
            width = MLP_HIDDEN if job.probe == "mlp" else classes
            probe_flops += epochs * 6 * rows * dim * width
    probe_seconds = extract_flops / throughput.train_flops_per_s + probe_flops / throughput.probe_flops_per_s
    train_hours, probe_hours = train_seconds / 3600, probe_seconds / 3600
    return CellCost(cell.label, cell.config_hash, images_seen, train_hours, probe_hours, train_hours + probe_hours,
                    workload["checkpoint_bytes"], cache, memory, throughput.source)


def _sgd_epochs(sgd: Any) -> float:
    if sgd is not None and sgd.epochs:
        return sgd.epochs
    return SGD_SCHEDULE_EPOCHS[sgd.schedule if sgd is not None else "paper"]


def _default_preset(dataset: str) -> str:
    from pretextlab.evaluate.probe_run import EvalConfig

    return EvalConfig(probe="sgd", dataset=dataset).resolved_sgd_preset()


def study_cost(study: Study, cells: list[Cell], inputs_path: Path | None = None, device_check: Path | None = None,
               ranks: int = GPUS_PER_NODE) -> dict[str, Any]:
    """Every cell's cost, the grid's total (the sum of the cells) and the 8-GPU nodes that finish it in a week."""
    inputs = load_inputs(inputs_path)
    cited, measured = throughputs(inputs, device_check)
    costs = [cell_cost(study, cell, inputs, measured.get((cell.config.network, cell.config.width), cited), ranks)
             for cell in cells]
    total = {f.name: sum(getattr(c, f.name) for c in costs) for f in fields(CellCost)
             if f.type in ("int", "float") and f.name != "probe_memory_per_rank_bytes"}
    total["probe_memory_per_rank_bytes"] = max((c.probe_memory_per_rank_bytes for c in costs), default=0)
    return {
        "cells": [asdict(c) for c in costs],
        "total": total,
        "nodes_for_one_week": math.ceil(total["gpu_hours"] / (GPUS_PER_NODE * HOURS_PER_WEEK)),
        "gpus_per_node": GPUS_PER_NODE,
        "probe_ranks": ranks,
        "throughput": {"cited": asdict(cited), "cited_source": A100.source,
                       "measured": {f"{n} k={w}": asdict(t) for (n, w), t in measured.items()}},
        "inputs": str(inputs_path or COST_INPUTS),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def format_cost(cost: dict[str, Any]) -> str:
    """The cost as a Markdown table (people read it on stderr; docs/scale.md holds the paper grid's)."""
    lines = ["| cell | train GPU-h | probe GPU-h | GPU-h | checkpoint | feature cache | probe memory per rank |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cost["cells"] + [{**cost["total"], "cell": "**total**"}]:
        lines.append(f"| {c['cell']} | {_hours(c['train_gpu_hours'])} | {_hours(c['probe_gpu_hours'])} | {_hours(c['gpu_hours'])} "
                     f"| {_size(c['checkpoint_bytes'])} | {_size(c['feature_cache_bytes'])} | {_size(c['probe_memory_per_rank_bytes'])} |")
    lines.append(f"\n{_hours(cost['total']['gpu_hours'])} GPU-hours: {cost['nodes_for_one_week']} node(s) of "
                 f"{cost['gpus_per_node']} GPUs finish the grid in a week; probe memory at {cost['probe_ranks']} ranks.")
    return "\n".join(lines)
