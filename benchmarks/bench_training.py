"""Training-step throughput: each pretext task end to end against the bare network, side by side.

For every task the same network (resnet50v1, width 4 by default) is timed two ways in one process:

- task, end to end: decoded uint8 batch from the loader -> task.prepare on the device (crops,
  flips, jitter, rotations, patches) -> forward -> head -> loss -> backward -> SGD step (the
  trainer's own ``train_step``, including its per-step metric reduction);
- bare network: forward -> backward -> SGD step of the network alone on already prepared float
  tensors of exactly the shapes the task feeds it (loss = mean of pre_logits, no head).

ratio = bare time / task time: the share of the step the network itself takes (1.0 = the task's
own work is free; the goal is >= 0.90). Each precision setting (fp32 contiguous, bf16 autocast +
channels_last) is measured for both. ``--processes`` also compares 1 against 2 training processes
(torchrun, gloo) on CPU at the same global batch.

    .venv/bin/python benchmarks/bench_training.py [--width 4] [--steps 6] [--processes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretextlab import atomic
from pretextlab.config import TrainConfig
from pretextlab.training import Trainer

RESULTS = Path(__file__).parent / "results" / "training.json"

# Inputs sized for a 2-core CPU: 32 px images for the whole-image tasks, 16 px patches (a 3x3 grid
# cut from a 56 px image) for the patch tasks. Batches in images per step.
TASKS = {
    "rotation": dict(image_size=32, batch_size=16),
    "exemplar": dict(image_size=32, batch_size=4, copies=8),
    "jigsaw": dict(image_size=56, patch_size=16, batch_size=4),
    "relative_patch": dict(image_size=56, patch_size=16, batch_size=4),
}
SETTINGS = {
    "fp32": dict(precision="fp32", channels_last=False),
    "bf16+channels_last": dict(precision="bf16", channels_last=True),
}


def _config(task: str, width: int, setting: str, patch_size: int) -> TrainConfig:
    sizes = dict(TASKS[task])
    if "patch_size" in sizes:  # the image a 3x3 grid of patch_size patches is cut from (3.5 x patch)
        sizes.update(patch_size=patch_size, image_size=round(3.5 * patch_size))
    return TrainConfig(
        task=task, network="resnet50v1", width=width, dataset="fashion-mnist", limit=2000, val_size=100,
        test_limit=100, epochs=1, device="cpu", **sizes, **SETTINGS[setting],
    )


def _time_task(trainer: Trainer, steps: int, warmup: int) -> tuple[float, tuple[int, ...]]:
    batches = trainer._epoch_batches()
    shape = None
    for index in range(warmup + steps):
        if index == warmup:
            started = time.perf_counter()
        batch = next(batches)
        trainer.train_step(batch.images)
        trainer.step += 1
    elapsed = (time.perf_counter() - started) / steps
    inputs, *_ = trainer.task.prepare(batch.images, True, trainer._generator(0))
    shape = tuple(inputs.shape)
    return elapsed, shape


def _time_bare(trainer: Trainer, shape: tuple[int, ...], steps: int, warmup: int) -> float:
    network = trainer.network
    network.train()
    inputs = torch.randn(shape)
    if trainer.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-4, momentum=0.9)
    for index in range(warmup + steps):
        if index == warmup:
            started = time.perf_counter()
        with trainer._autocast():
            loss = network(inputs)["pre_logits"].float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def measure_tasks(width: int, steps: int, warmup: int, patch_size: int, tasks: list[str], settings: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for setting in settings:
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = Trainer(_config(task, width, setting, patch_size), run_dir, progress=False)
                task_seconds, shape = _time_task(trainer, steps, warmup)
                bare_seconds = _time_bare(trainer, shape, steps, warmup)
            images = trainer.config.batch_size
            row = dict(
                task=task, setting=setting, network_inputs=list(shape), images_per_step=images,
                task_images_per_s=images / task_seconds, bare_images_per_s=images / bare_seconds,
                ratio=bare_seconds / task_seconds,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def measure_processes(width: int, steps: int) -> list[dict]:
    """Rotation at a global batch of 32: one process (2 threads) against two (1 thread each)."""
    rows = []
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as run_dir:
            config = TrainConfig(
                task="rotation", network="resnet50v1", width=width, dataset="fashion-mnist", image_size=32,
                limit=32 * (steps + 2) + 100, val_size=100, test_limit=100, batch_size=32 // processes,
                epochs=1, device="cpu", val_batches=1, log_every=1,
            )
            threads = str(2 // processes)
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            base = [sys.executable]
            if processes > 1:
                base += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
            else:
                base += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
            worker = Path(__file__).parent.parent / "tests" / "workers" / "ddp_train.py"
            dumps = Path(run_dir) / "dumps"
            dumps.mkdir()
            done = subprocess.run(
                base + [str(worker), json.dumps(config.to_dict()), str(Path(run_dir) / "run"), str(dumps)],
                capture_output=True, text=True, env=env,
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            metrics = [json.loads(l) for l in (Path(run_dir) / "run" / "metrics.jsonl").read_text().splitlines()]
            rates = [m["images_per_s"] for m in metrics if "images_per_s" in m][2:]  # skip warm-up steps
            row = dict(processes=processes, threads_each=int(threads), global_batch=32,
                       images_per_s=sum(rates) / len(rates))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--processes", action="store_true", help="also 1 vs 2 processes on CPU")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side of jigsaw/relative_patch (64 = the study)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = dict(
        device="cpu", threads=torch.get_num_threads(), width=args.width, steps=args.steps,
        patch_size=args.patch_size,
        tasks=measure_tasks(args.width, args.steps, args.warmup, args.patch_size, args.tasks, args.settings),
    )
    if args.processes:
        result["processes"] = measure_processes(args.width, args.steps)
    atomic.write_json(args.results, result)
    print()
    print(f"| task | setting | network inputs per step | task images/s | bare images/s | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for r in result["tasks"]:
        shape = "x".join(str(d) for d in r["network_inputs"])
        print(f"| {r['task']} | {r['setting']} | {shape} | {r['task_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} | {r['ratio']:.2f} |")
    for r in result.get("processes", []):
        print(f"processes={r['processes']} (threads each {r['threads_each']}): {r['images_per_s']:.1f} images/s")


if __name__ == "__main__":
    main()
