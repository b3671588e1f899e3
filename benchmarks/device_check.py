"""One command for the first GPU session (issue 19 item 3): the paths no GPU has measured yet, in <= 8 min.

Sections, each time-boxed, each result written (atomically) as soon as it is done, a failure recorded
in the JSON and the rest continuing, so a time-out or a crash loses nothing:

- ``training``: per network (resnet50v1, resnet50v2, revnet50, vgg19bn) at k=4 and 16, per task: the
  task's full step (trainer.train_step) against the bare network's forward/backward/step on inputs of
  the same shape (bench_training's timers), bf16 + channels_last, without and with torch.compile;
  goal task/bare >= 0.95. Each row also carries its counted FLOPs per image and the FLOP/s they imply
  (what study/cost.py uses in place of the cited throughput);
- ``revnet_memory``: RevNet50's memory-saving backward against ordinary backprop, CUDA peak memory and
  step time at k=4 and 16 (bench_revnet_memory's subprocess measurement);
- ``lbfgs``: the L-BFGS probe on the device against scikit-learn's lbfgs on 100k x 2048 features
  (bench_lbfgs's scikit-learn runner);
- ``ddp``: a one-process NCCL (gloo on CPU) torchrun training run of a few steps;
- ``loader``: the folder loader's images/s per worker (bench_loader) against the GPU's training images/s.

    .venv/bin/python benchmarks/device_check.py                     # on a GPU: results/device_check.json
    .venv/bin/python benchmarks/device_check.py --dry-run --out /tmp/dc.json   # CPU, tiny sizes (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the other benchmarks' functions are reused, not copied

import bench_lbfgs  # noqa: E402
import bench_loader  # noqa: E402
import bench_revnet_memory  # noqa: E402
import bench_training  # noqa: E402
from bench_cost_inputs import measure_workload  # noqa: E402

from pretextlab import atomic  # noqa: E402
from pretextlab.config import TrainConfig, resolve  # noqa: E402
from pretextlab.evaluate.common import ProbeData  # noqa: E402
from pretextlab.evaluate.lbfgs import LbfgsConfig, lbfgs_probe  # noqa: E402
from pretextlab.training import Trainer  # noqa: E402

RESULTS = HERE / "results" / "device_check.json"
NETWORKS = ("resnet50v1", "resnet50v2", "revnet50", "vgg19bn")
TASKS = ("rotation", "exemplar", "jigsaw", "relative_patch")
# Per mode: widths, tasks, image side, images per step, timed/warm-up steps, L-BFGS rows x dims, seconds per section.
SIZES = {
    "gpu": dict(widths=(4, 16), tasks=TASKS, image_size=224, patch_size=64, batch=32, steps=5, warmup=3,
                compile=(False, True), rows=100_000, dims=2048, revnet_batch=64, seconds=110),
    "dry": dict(widths=(1,), tasks=("rotation",), image_size=32, patch_size=16, batch=4, steps=1, warmup=1,
                compile=(False,), rows=600, dims=32, revnet_batch=8, seconds=60),
}


class SectionTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("the section ran past its time box")


def run_section(record: dict[str, Any], name: str, seconds: int, work: Callable[[], Any], out: Path) -> None:
    """Run one section under a time box; record its result or its failure; write the JSON either way."""
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        record[name] = work()
        record["sections"][name] = {"status": "ok"}
    except Exception as error:  # one section's failure must not cost the others (module doc)
        status = "timed out" if isinstance(error, SectionTimeout) else "failed"
        record["sections"][name] = {"status": status, "error": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)
    record["sections"][name]["seconds"] = round(time.perf_counter() - started, 1)
    atomic.write_json(out, record)
    print(json.dumps({"section": name, **{k: v for k, v in record["sections"][name].items() if k != "traceback"}}),
          file=sys.stderr, flush=True)


def _config(task: str, network: str, width: int, sizes: dict[str, Any], device: str, compile: bool) -> TrainConfig:
    patch = {"patch_size": sizes["patch_size"], "image_size": round(3.5 * sizes["patch_size"])} if task in ("jigsaw", "relative_patch") else {"image_size": sizes["image_size"]}
    copies = {"copies": 8} if task == "exemplar" else {}
    batch = max(2, sizes["batch"] // 8) if task == "exemplar" else sizes["batch"]
    return TrainConfig(task=task, network=network, width=width, dataset="fashion-mnist", limit=batch * (sizes["steps"] + sizes["warmup"] + 2) + 100,
                       val_size=100, test_limit=100, epochs=1, device=device, batch_size=batch, compile=compile,
                       precision="bf16" if device == "cuda" else "fp32", channels_last=device == "cuda", **patch, **copies)


def training(sizes: dict[str, Any], device: str, networks: list[str]) -> list[dict[str, Any]]:
    rows = []
    for network in networks:
        for width in sizes["widths"]:
            for task in sizes["tasks"]:
                for compile in sizes["compile"]:
                    config = _config(task, network, width, sizes, device, compile)
                    try:
                        with tempfile.TemporaryDirectory() as run_dir:
                            trainer = Trainer(config, run_dir, progress=False)
                            task_s, shape = bench_training._time_task(trainer, sizes["steps"], sizes["warmup"])
                            bare_s = bench_training._time_bare(trainer, shape, sizes["steps"], sizes["warmup"])
                        flops = measure_workload(resolve(config), 1.0)["train_flops_per_image"]
                        images = config.batch_size
                        rows.append(dict(network=network, width=width, task=task, compile=compile,
                                         setting="bf16+channels_last" if device == "cuda" else "fp32",
                                         network_inputs=list(shape), task_images_per_s=images / task_s,
                                         bare_images_per_s=images / bare_s, ratio=bare_s / task_s,
                                         train_flops_per_image=flops, task_flops_per_s=flops * images / task_s))
                    except SectionTimeout:
                        raise
                    except Exception as error:  # e.g. out of memory at k=16: recorded, the grid goes on
                        rows.append(dict(network=network, width=width, task=task, compile=compile, error=f"{type(error).__name__}: {error}"))
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def revnet_memory(sizes: dict[str, Any], device: str) -> list[dict[str, Any]]:
    rows = []
    for width in sizes["widths"]:
        pair = {}
        for reversible in (False, True):
            case = bench_revnet_memory.Case(device, width, sizes["image_size"], sizes["revnet_batch"], 1, reversible, sizes["steps"], 1)
            m = bench_revnet_memory._measure_in_subprocess(case)
            pair["reversible" if reversible else "ordinary"] = dict(peak_mib=m.peak_mib, saved_mib=m.saved_mib, step_seconds=m.step_seconds)
        rows.append(dict(width=width, batch=sizes["revnet_batch"], image_size=sizes["image_size"], **pair,
                         peak_ratio=pair["ordinary"]["peak_mib"] / max(pair["reversible"]["peak_mib"], 1e-9),
                         time_ratio=pair["reversible"]["step_seconds"] / pair["ordinary"]["step_seconds"]))
    return rows


def lbfgs(sizes: dict[str, Any], device: str) -> dict[str, Any]:
    """Separable-ish synthetic features (class means + noise): the solvers' speed, not an accuracy claim."""
    rng = np.random.default_rng(0)
    classes, dims = 10, sizes["dims"]
    means = rng.normal(size=(classes, dims)).astype(np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return (means[y] + 3 * rng.normal(size=(n, dims))).astype(np.float32), y

    data = {"train": split(sizes["rows"]), "val": split(sizes["rows"] // 10), "test": split(sizes["rows"] // 10)}
    grid = (1e-2, 1e-3, 1e-4)
    started = time.perf_counter()
    ours = lbfgs_probe(ProbeData(data["train"], data["val"], data["test"], num_classes=classes),
                       LbfgsConfig(l2_grid=grid, device=device), progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    evals = sum(s["function_evals"] for s in ours.per_setting)
    args = argparse.Namespace(grid=list(grid), max_iter=LbfgsConfig().max_iter, tolerance=LbfgsConfig().tolerance)
    sklearn = bench_lbfgs.run_sklearn(data, args)
    n = sizes["rows"]
    return {"rows": n, "dims": dims, "classes": classes, "grid": list(grid), "device": device,
            "ours_seconds": seconds, "ours_test_top1_percent": ours.test_top1_percent, "function_evals": evals,
            "sklearn_seconds": sklearn["seconds"], "sklearn_test_top1_percent": 100 * sklearn["test_top1"],
            "speedup": sklearn["seconds"] / seconds,
            # the cost model's count of the fit's matmuls (study/cost.py lbfgs_flops), per second
            "gpu_flops_per_s": evals * 4 * n * dims * classes / seconds}


def ddp(sizes: dict[str, Any], device: str) -> dict[str, Any]:
    config = _config("rotation", "resnet50v1", sizes["widths"][0], sizes, device, False)
    with tempfile.TemporaryDirectory() as tmp:
        dumps = Path(tmp) / "dumps"
        dumps.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   str(HERE.parent / "tests" / "workers" / "ddp_train.py"), json.dumps(config.to_dict()), str(Path(tmp) / "run"), str(dumps)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-1500:])
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    return {"backend": "nccl" if device == "cuda" else "gloo", "processes": 1, "steps": len(rates),
            "images_per_s": rates[-1] if rates else None}


def loader(sizes: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    args = argparse.Namespace(images=8 if sizes is SIZES["dry"] else 64, rounds=1 if sizes is SIZES["dry"] else 3, quality=90)
    results, _ = bench_loader.measure(bench_loader.SIZE, args)
    per_worker = results["crop-at-decode"]["files_per_second_per_worker"]
    gpu = [r["task_images_per_s"] for r in record.get("training", []) if r.get("task") == "rotation" and "task_images_per_s" in r]
    fastest = max(gpu) if gpu else None
    return {"files_per_s_per_worker": per_worker, "fastest_rotation_images_per_s": fastest,
            "workers_to_feed_it": None if fastest is None else fastest / per_worker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, gloo, no compile (the test suite's run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS, help="training section's networks")
    parser.add_argument("--sections", nargs="+", default=["training", "revnet_memory", "lbfgs", "ddp", "loader"])
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device visible; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    record: dict[str, Any] = {"benchmark": "device check", "dry_run": args.dry_run, "torch": torch.__version__,
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}, "sections": {}}
    work = {"training": lambda: training(sizes, device, args.networks), "revnet_memory": lambda: revnet_memory(sizes, device),
            "lbfgs": lambda: lbfgs(sizes, device), "ddp": lambda: ddp(sizes, device), "loader": lambda: loader(sizes, record)}
    for name in args.sections:
        run_section(record, name, sizes["seconds"], work[name], args.out)
    print(json.dumps({"out": str(args.out), "sections": {k: v["status"] for k, v in record["sections"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
