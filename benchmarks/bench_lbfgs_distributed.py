"""The L-BFGS probe data-parallel (issue 19): 1 and 2 ranks side by side, and half-precision storage.

Features: pre_logits of a random-init ResNet50 v1 on Fashion-MNIST at 32 px, extracted and cached
by ``bench_lbfgs.features`` (the same cache as benchmarks/bench_lbfgs.py).

1. Throughput and memory: the same float32 fit (one L2 value, a fixed number of L-BFGS iterations:
   the tolerance is set below reach) runs under torchrun with 1 and then 2 ranks (gloo, CPU, one
   thread per rank). Per rank: training rows held, the bytes of features it holds on its device
   (the resident standardised tensor, not RSS), rows/s = rows held x closure evaluations / fit
   seconds. On this 2-core machine both ranks share the cores the one rank had alone.
2. ``--feature-dtype``: the same features rounded to bfloat16 and float16 as the cache stores them
   (``features.encoded``, read back as the probe reads them), probed with the full L2 grid; test
   top-1 against float32.

    .venv/bin/python benchmarks/bench_lbfgs_distributed.py --limit 20000 --test-limit 5000 --width 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_lbfgs import features  # noqa: E402  (the cached features of the L-BFGS benchmark)

from pretextlab import atomic  # noqa: E402
from pretextlab.evaluate.cache_files import Bfloat16Rows  # noqa: E402
from pretextlab.evaluate.common import ProbeData  # noqa: E402
from pretextlab.evaluate.features import encoded  # noqa: E402
from pretextlab.evaluate.lbfgs import LbfgsConfig, lbfgs_probe  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="resnet50v1")
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--iterations", type=int, default=40, help="L-BFGS iterations of the timed fit")
    parser.add_argument("--grid", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5], help="dtype part's L2 grid")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="/tmp/pretextlab-bench-lbfgs")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(HERE / "results" / "lbfgs_distributed.json"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("FEATURES", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(folder: Path, out: Path, iterations: int) -> None:
    """One rank under torchrun: the timed sharded fit; rank 0 writes what every rank measured."""
    import torch.distributed as dist

    from pretextlab.evaluate.distributed_probe import sharded_lbfgs_fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    splits = [(np.load(folder / f"{s}_x.npy", mmap_mode="r"), np.load(folder / f"{s}_y.npy")) for s in ("train", "val", "test")]
    config = LbfgsConfig(l2_grid=(1e-3,), max_iter=iterations, tolerance=1e-30, device="cpu")
    result, _, _ = sharded_lbfgs_fit(ProbeData(*splits, num_classes=10), config, progress=False)
    fit = result.per_setting[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = result.settings.get("rank_train_rows", len(splits[0][1]))
    held = result.settings.get("rank_feature_bytes", rows * splits[0][0].shape[1] * 4)
    mine = {"rank": rank, "train_rows": rows, "feature_bytes": held, "function_evals": fit["function_evals"],
            "fit_seconds": fit["seconds"], "rows_per_second": rows * fit["function_evals"] / fit["seconds"],
            "val_top1_percent": result.val_top1_percent, "test_top1_percent": result.test_top1_percent}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        atomic.write_json(out, {"world_size": world, "ranks": gathered})
    dist.destroy_process_group()


def ranks_side_by_side(data: dict[str, tuple[np.ndarray, np.ndarray]], args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    for split, (x, y) in data.items():
        np.save(folder / f"{split}_x.npy", np.asarray(x, dtype=np.float32))
        np.save(folder / f"{split}_y.npy", np.asarray(y))
    runs = []
    for world in (1, 2):
        out = folder / f"world{world}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   str(Path(__file__).resolve()), "--worker", str(folder), str(out), "--iterations", str(args.iterations)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs.append(json.loads(out.read_text()))
        for r in runs[-1]["ranks"]:
            print(f"world {world} rank {r['rank']}: {r['train_rows']} rows, {r['feature_bytes'] / 2**20:.1f} MiB of features, "
                  f"{r['rows_per_second']:,.0f} rows/s ({r['function_evals']} evaluations in {r['fit_seconds']:.1f} s)")
    return runs


def dtype_accuracy(data: dict[str, tuple[np.ndarray, np.ndarray]], args: argparse.Namespace) -> list[dict[str, Any]]:
    config = LbfgsConfig(l2_grid=tuple(args.grid), device="cpu")
    rows = []
    for name in ("float32", "bfloat16", "float16"):
        stored = {}
        for split, (x, y) in data.items():
            x = np.asarray(x, dtype=np.float32)
            kept = encoded(x, name, split)
            stored[split] = (Bfloat16Rows(kept) if name == "bfloat16" else kept, y)
        started = time.perf_counter()
        result = lbfgs_probe(ProbeData(stored["train"], stored["val"], stored["test"], 10), config, progress=not args.no_progress)
        rows.append({"feature_dtype": name, "bytes_per_value": kept.dtype.itemsize, "chosen_l2": result.chosen["l2"],
                     "val_top1_percent": result.val_top1_percent, "test_top1_percent": result.test_top1_percent,
                     "seconds": time.perf_counter() - started})
        print(f"{name}: chosen l2 {result.chosen['l2']:.0e}, val {result.val_top1_percent:.2f}%, test {result.test_top1_percent:.2f}%")
    return rows


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.iterations)
        return
    torch.set_num_threads(1)
    data = features(args)
    folder = Path(args.cache_dir) / "distributed"
    folder.mkdir(parents=True, exist_ok=True)
    runs = ranks_side_by_side(data, args, folder)
    dtypes = dtype_accuracy(data, args)
    atomic.write_json(args.out, {
        "benchmark": "bench_lbfgs_distributed", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "features": {"network": args.network, "width": args.width, "image_size": args.image_size, "random_init": True,
                     "output": "pre_logits", "shape": {s: list(np.shape(x)) for s, (x, _) in data.items()}},
        "timed_fit": {"l2": 1e-3, "iterations": args.iterations, "dtype": "float32", "threads_per_rank": 1},
        "ranks": runs, "feature_dtype": dtypes,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
