"""RevNet's memory-saving backward against ordinary backprop: peak training-step memory and step time.

Side by side in one run, for RevNets of several depths (units per stage = the study's 3, 4, 6, 3
times a multiplier) and several batch sizes: one training step = zero_grad, forward, Rotation's
4-way cross-entropy on pre_logits, backward, momentum SGD step.

How memory is measured, per configuration and mode, each in a fresh subprocess (so no allocator
cache or earlier peak carries over):

- CPU: the process's resident set size. Two warm-up steps first (they allocate the optimizer's
  momentum, oneDNN's caches, the gradients); then the kernel's high-water mark is reset
  (``/proc/self/clear_refs`` 5) and the measured step's peak is VmHWM - VmRSS before the step.
  glibc is told (``MALLOC_MMAP_THRESHOLD_``) to serve every block over 64 KiB with its own mmap,
  returned to the system when freed, so the resident size follows live tensors instead of
  whatever the heap kept. It counts everything the step touches: activations, gradients,
  temporaries, allocator slack.
- CUDA: ``torch.cuda.max_memory_allocated()`` during the measured step minus the memory allocated
  before it (weights, momentum, the batch): the step's own peak, as PyTorch's allocator sees it.
- Both: "saved" is the bytes of the distinct tensors autograd keeps for backward after the
  forward (``saved_tensors_hooks``; parameters excluded): exact and allocator-independent.

Step time: the median of ``--steps`` timed steps after the warm-up (CUDA synchronised). The
reconstruction error column is the largest relative error of a recomputed unit input in one
extra step with the check on (``ReconstructionCheck``), after the measurements.

    .venv/bin/python benchmarks/bench_revnet_memory.py                  # the README's CPU table
    .venv/bin/python benchmarks/bench_revnet_memory.py --device cuda --width 4 --image-size 224 \
        --batch-sizes 32 64 128 --depths 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pretextlab.atomic import write_json, write_text
from pretextlab.errors import PretextlabError
from pretextlab.models.reversible import ReconstructionCheck
from pretextlab.models.revnet import revnet50
from pretextlab.models.resnet import STAGE_DEPTHS
from pretextlab.tasks.rotation import rotate_all

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MIB = 2**20


@dataclass
class Case:
    """One subprocess's configuration."""

    device: str
    width: int
    image_size: int
    batch_size: int  # network inputs per step (batch_size / 4 images, each in 4 rotations)
    depth_multiplier: int
    reversible: bool
    steps: int
    threads: int

    @property
    def units_per_stage(self) -> tuple[int, ...]:
        return tuple(self.depth_multiplier * n for n in STAGE_DEPTHS)


@dataclass
class Measurement:
    case: Case
    peak_mib: float
    saved_mib: float
    step_seconds: float
    step_seconds_all: list[float]
    reconstruction_error: float | None
    loss: float


# ------------------------------------------------------------------ worker (one subprocess)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))


def _batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images when Fashion-MNIST is installed (gray, repeated to 3 channels), else noise."""
    images_needed = case.batch_size // 4
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        from pretextlab.data import fashion_mnist

        arrays = fashion_mnist.read_fashion_mnist(FASHION_DIR)
        gray = fashion_mnist.resize_gray(arrays.train_images[:images_needed], case.image_size).float() / 127.5 - 1
        images = gray.expand(-1, 3, -1, -1)
    else:
        images = torch.rand(images_needed, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inputs, targets = rotate_all(images.contiguous())
    return inputs.to(device), targets.to(device)


def _saved_bytes(network: nn.Module, inputs: torch.Tensor) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = network(inputs)
    del outputs
    return sum(storages.values())


def run_case(case: Case) -> Measurement:
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    torch.manual_seed(0)
    network = revnet50(case.width, units_per_stage=case.units_per_stage, reversible_backward=case.reversible)
    head = nn.Linear(network.out_dim, 4)
    network.to(device).train()
    head.to(device).train()
    parameters = list(network.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9, weight_decay=1e-4)
    inputs, targets = _batch(case, device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(network(inputs)["pre_logits"]), targets)
        loss.backward()
        optimizer.step()
        return loss.item()  # synchronises CUDA

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = step()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current resident size
        loss = step()
        peak = (_status_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(case.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    saved = _saved_bytes(network, inputs)
    error = None
    if case.reversible:
        network.reversible_check = ReconstructionCheck()
        step()
        error = network.reversible_check.worst
    return Measurement(case, peak / MIB, saved / MIB, statistics.median(times), times, error, loss)


# ------------------------------------------------------------------ driver


def _measure_in_subprocess(case: Case) -> Measurement:
    env = dict(os.environ)
    # Large blocks from their own mmap, unmapped when freed: resident size tracks live memory.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["OMP_NUM_THREADS"] = str(case.threads)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measurement of {case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["case"] = Case(**result["case"])
    return Measurement(**result)


def _table(pairs: list[tuple[Measurement, Measurement]], device: str) -> str:
    peak_name = "peak RSS increase" if device == "cpu" else "peak allocated"
    lines = [
        f"| units per stage | batch | {peak_name}, ordinary (MiB) | reversible (MiB) | ordinary / reversible "
        "| saved for backward, ordinary (MiB) | reversible (MiB) | step, ordinary (s) | reversible (s) "
        "| reversible / ordinary | reconstruction error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ordinary, reversible in pairs:
        case = ordinary.case
        units = ", ".join(str(n) for n in case.units_per_stage)
        lines.append(
            f"| {units} | {case.batch_size} | {ordinary.peak_mib:.1f} | {reversible.peak_mib:.1f} "
            f"| {ordinary.peak_mib / reversible.peak_mib:.2f}x | {ordinary.saved_mib:.1f} | {reversible.saved_mib:.1f} "
            f"| {ordinary.step_seconds:.3f} | {reversible.step_seconds:.3f} "
            f"| {reversible.step_seconds / ordinary.step_seconds:.2f}x | {reversible.reconstruction_error:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--width", type=int, default=1, help="widening factor k")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="network inputs per step at depth multiplier 1 (multiples of 4)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4],
                        help="depth multipliers of (3, 4, 6, 3) units per stage, run at --depth-batch")
    parser.add_argument("--depth-batch", type=int, default=128, help="batch size of the depth sweep")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results (JSON) and the table (.md) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        measurement = run_case(Case(**json.loads(args.worker)))
        print(json.dumps(asdict(measurement)))
        return 0

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda"):
        raise PretextlabError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PretextlabError("--device cuda but no CUDA device is visible: use --device cpu")
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise PretextlabError("CPU peak memory is read from /proc/self (Linux only): run on Linux or with --device cuda")
    sizes = list(args.batch_sizes) + list(args.depths) + [args.depth_batch]
    if any(n < 1 for n in sizes) or any(b % 4 for b in list(args.batch_sizes) + [args.depth_batch]):
        raise PretextlabError("batch sizes must be positive multiples of 4 (each image in its 4 rotations), depths >= 1")

    grid = [(1, batch) for batch in args.batch_sizes] + [(d, args.depth_batch) for d in args.depths]
    grid = list(dict.fromkeys(grid))  # the depth-1 point of the depth sweep may repeat a batch point
    from tqdm import tqdm

    pairs = []
    started = time.perf_counter()
    for depth, batch in tqdm(grid, desc="configurations", unit="config"):
        pair = tuple(
            _measure_in_subprocess(Case(device, args.width, args.image_size, batch, depth, reversible, args.steps, args.threads))
            for reversible in (False, True)
        )
        pairs.append(pair)
    elapsed = time.perf_counter() - started
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    heading = (
        f"RevNet k={args.width}, {args.image_size}x{args.image_size} inputs, {where}, torch {torch.__version__}; "
        f"{len(grid)} configurations in {elapsed:.0f} s\n\n"
    )
    table = heading + _table(pairs, device)
    print(table)
    if args.out is not None:
        write_json(args.out.with_suffix(".json"), {"device": where, "pairs": [[asdict(m) for m in pair] for pair in pairs]})
        write_text(args.out.with_suffix(".md"), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
