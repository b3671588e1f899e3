"""The kNN monitor's cost as a share of an epoch at the demo's settings (issue 17: goal <= 5%).

One process, side by side and interleaved (so both see the same machine load): the demo's training
run (demo.py's DEMO_TRAINING["rotation"] with its monitor outputs) is built as `pretextlab demo`
builds it; each round times ``--steps`` training steps (after ``--warmup`` untimed ones) and one call
of the monitor (frozen features of its labelled bank and its scored images at every monitored
output, then the weighted kNN at k=20 and 200). An epoch = median step time x steps per epoch + one
pass of the epoch's pretext validation (timed once); share = monitor / epoch.

    .venv/bin/python benchmarks/bench_monitor.py --out benchmarks/results/monitor.json   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pretextlab import atomic
from pretextlab.demo import DemoConfig, demo_train_config
from pretextlab.training import Trainer


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(rounds: int, steps: int, warmup: int, threads: int, labels: int | None, images: int | None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    overrides = {k: v for k, v in (("monitor_labels", labels), ("monitor_images", images)) if v is not None}
    config = demo_train_config(DemoConfig(device="cpu", training=overrides))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(config, Path(scratch) / "run", progress=False)
        try:
            batches = iter(trainer._epoch_batches())
            for _ in range(warmup):
                trainer.train_step(next(batches).images)
            step_seconds, monitor_seconds, fields = [], [], {}
            for _ in range(rounds):
                for _ in range(steps):
                    step_seconds.append(_timed(lambda: trainer.train_step(next(batches).images)))
                monitor_seconds.append(_timed(lambda: fields.update(trainer._monitor())))
            validation = _timed(lambda: trainer.pretext_accuracy(trainer.splits.val))
            sets = trainer.monitor.sets
        finally:
            trainer.lock.release()
    step = statistics.median(step_seconds)
    epoch = step * trainer.steps_per_epoch + validation
    monitor = statistics.median(monitor_seconds)
    return {
        "settings": {"monitor_outputs": list(config.monitor_outputs), "bank_images": len(sets.bank),
                     "scored_images": len(sets.scored), "steps_per_epoch": trainer.steps_per_epoch,
                     "batch_size": config.batch_size, "network": config.network, "width": config.width,
                     "image_size": config.image_size, "threads": threads, "rounds": rounds, "steps_per_round": steps},
        "step_seconds_median": step,
        "validation_seconds": validation,
        "epoch_seconds": epoch,
        "monitor_seconds_median": monitor,
        "monitor_seconds": monitor_seconds,
        "monitor_share_of_epoch_percent": 100.0 * monitor / epoch,
        "goal_percent": 5.0,
        "last_monitor_fields": fields,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the demo's 2 CPU cores")
    parser.add_argument("--monitor-labels", type=int, default=None, help="override the default bank size")
    parser.add_argument("--monitor-images", type=int, default=None, help="override the default scored images")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.steps, args.warmup, args.threads, args.monitor_labels, args.monitor_images)
    if args.out is not None:
        atomic.write_json(args.out, result)
    print(f"epoch {result['epoch_seconds']:.1f} s (step {result['step_seconds_median']:.3f} s x "
          f"{result['settings']['steps_per_epoch']} + validation {result['validation_seconds']:.1f} s); monitor "
          f"{result['monitor_seconds_median']:.2f} s = {result['monitor_share_of_epoch_percent']:.2f}% of an epoch "
          f"(goal <= 5%)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
