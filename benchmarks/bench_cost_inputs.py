"""The cost model's inputs (study/cost.py, docs/scale.md), measured: per workload of a study's cells,
FLOPs per image, parameters, checkpoint bytes and the shape of every named output.

For every distinct workload (task, network, width, representation size, input sizes: cost.workload_key)
of the given study files:

- the network and the task's head are built exactly as a run builds them (training.model.build_model)
  on PyTorch's meta device, so a k=16 network costs no memory;
- the task prepares two real uint8 images (as the loader delivers them: decode plan or centre square)
  and its network inputs give the inputs per image and their side;
- ``torch.utils.flop_counter``'s per-operator formulas count one training step's forward + backward of the
  network and of the head on meta tensors of those shapes (matmuls and convolutions: what a GPU
  spends its time on), and the frozen network's forward on the task's evaluation views, whose named
  outputs' shapes give the probes' feature sizes (evaluate/pooling.py's 9000-value rule);
- RevNet's memory-saving backward recomputes the forward and cannot run on meta tensors: its extra
  FLOPs are the ratio measured on real CPU tensors at width 1 (``reversible_recompute_ratio``);
- checkpoint bytes = the network's and head's state_dict bytes + one momentum buffer per trainable
  parameter (what the trainer saves), checked against a real ``torch.save`` at width 1.

It also reads the L-BFGS probe's measured function evaluations per L2 value (results/lbfgs.json) and
times a small CPU training step (width 1, 32 px) as a sanity check of FLOPs -> seconds.

    .venv/bin/python benchmarks/bench_cost_inputs.py                 # both shipped studies (~2 min)
    .venv/bin/python benchmarks/bench_cost_inputs.py --study my.yaml --out my_inputs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from pretextlab import atomic
from pretextlab.config import TrainConfig, resolve
from pretextlab.models import network_info
from pretextlab.study import expand_cells, load_study
from pretextlab.study.cost import COST_INPUTS, REFERENCE_NETWORK, workload_key
from pretextlab.training.model import build_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDIES = (ROOT / "configs" / "paper-imagenet.yaml", ROOT / "configs" / "mini-fashion.yaml")
IMAGES = 2  # images prepared per measurement: FLOPs are per image, so any count gives the same figure


def _on_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's per-operator counts (``flop_registry``) without its module tracker, whose
    hooks cannot follow RevNet's memory-saving backward (a custom autograd Function re-running modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def _count(run) -> int:
    with FlopCount() as counter:
        run()
    return counter.total


def _network_step_flops(network: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, dict[str, torch.Tensor]]:
    x = torch.empty(shape, device=next(network.parameters()).device)
    outputs: dict[str, torch.Tensor] = {}

    def step() -> None:
        outputs.update(network(x))
        features = outputs["pre_logits"]
        features.backward(torch.ones_like(features))

    return _count(step), outputs


def measure_workload(config: TrainConfig, recompute_ratio: float) -> dict[str, Any]:
    """One workload's FLOPs per image, parameters, checkpoint bytes and output shapes (see module doc)."""
    reversible = network_info(config.network).supports_reversible_backward and config.reversible_backward is not False
    meta_config = dataclasses.replace(config, reversible_backward=False) if reversible else config
    with torch.device("meta"):
        network, task = build_model(meta_config)
    network.train()
    plan = task.decode_plan(True)
    rows, side = (IMAGES * plan.copies, plan.size) if plan is not None else (IMAGES, config.decode_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (rows, 3, side, side), dtype=torch.uint8, generator=generator)
    prepared = task.prepare(images, True, generator)
    network_flops, outputs = _network_step_flops(network, tuple(prepared.inputs.shape))
    if reversible:
        network_flops = round(network_flops * recompute_ratio)
    features = torch.empty(outputs["pre_logits"].shape, device="meta", requires_grad=True)
    context = _on_meta(prepared.context)
    head_flops = _count(lambda: task(features, context).float().sum().backward())

    network.eval()
    views, per_image = task.eval_views(torch.randint(0, 256, (IMAGES, 3, config.decode_size, config.decode_size),
                                                     dtype=torch.uint8, generator=generator))
    with torch.no_grad():
        shapes: dict[str, list[int]] = {}
        eval_flops = _count(lambda: shapes.update({k: list(v.shape[1:]) for k, v in network(views.to("meta")).items()}))
    trainable = sum(p.numel() for p in list(network.parameters()) + list(task.parameters()) if p.requires_grad)
    return {
        "task": config.task,
        "network": config.network,
        "width": config.width,
        "representation_size": config.representation_size,
        "train_inputs_per_image": prepared.inputs.shape[0] // IMAGES,
        "train_input_shape": list(prepared.inputs.shape[1:]),
        "train_flops_per_image": (network_flops + head_flops) // IMAGES,
        "train_head_flops_per_image": head_flops // IMAGES,
        "reversible_backward": reversible,
        "eval_views_per_image": per_image,
        "eval_view_shape": list(views.shape[1:]),
        "eval_forward_flops_per_image": eval_flops // IMAGES,
        "output_shapes_per_view": shapes,
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "head_parameters": sum(p.numel() for p in task.parameters()),
        # What the trainer's checkpoint holds: both state_dicts and SGD's momentum buffers (float32).
        "checkpoint_bytes": _state_bytes(network) + _state_bytes(task) + 4 * trainable,
    }


def _tiny_config(**fields: Any) -> TrainConfig:
    return resolve(TrainConfig(dataset="fashion-mnist", width=1, image_size=32, device="cpu", **fields))


def recompute_ratio() -> float:
    """FLOPs of RevNet's memory-saving training step over ordinary backprop's (real CPU tensors, k=1, 32 px)."""
    counts = []
    for reversible in (False, True):
        torch.manual_seed(0)
        network, _ = build_model(_tiny_config(task="rotation", network="revnet50", reversible_backward=reversible))
        counts.append(_network_step_flops(network.train(), (8, 3, 32, 32))[0])
    return counts[1] / counts[0]


def checkpoint_check() -> dict[str, int]:
    """The checkpoint-bytes formula against a real torch.save of the same state at width 1."""
    config = _tiny_config(task="rotation", network="resnet50v1")
    network, task = build_model(config)
    parameters = list(network.parameters()) + list(task.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()  # creates the momentum buffers the checkpoint holds
    buffer = io.BytesIO()
    torch.save({"network": network.state_dict(), "task": task.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    formula = _state_bytes(network) + _state_bytes(task) + 4 * sum(p.numel() for p in parameters)
    return {"formula_bytes": formula, "saved_bytes": buffer.tell()}


def cpu_check(steps: int = 3) -> dict[str, float]:
    """Measured CPU images/s of a small training step, and the FLOP/s it implies (sanity check)."""
    torch.manual_seed(0)
    network, _ = build_model(_tiny_config(task="rotation", network="resnet50v1"))
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(16, 3, 32, 32)
    flops, _ = _network_step_flops(network, tuple(x.shape))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        network(x)["pre_logits"].mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    seconds = min(times[1:])  # the first step warms oneDNN up
    return {"network": "resnet50v1", "width": 1, "inputs": 16, "side": 32, "threads": torch.get_num_threads(),
            "seconds_per_step": seconds, "images_per_s": 16 / seconds, "flops_per_s": flops / seconds}


def lbfgs_evaluations(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    per_l2 = [s["function_evals"] for s in record["ours"]["per_setting"]]
    return {"source": str(path.relative_to(ROOT)), "features": record["features"]["shapes"]["train"],
            "function_evals_per_l2": per_l2, "mean_function_evals_per_l2": sum(per_l2) / len(per_l2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", nargs="+", type=Path, default=list(STUDIES), help="study files whose cells to measure")
    parser.add_argument("--out", type=Path, default=COST_INPUTS)
    parser.add_argument("--lbfgs", type=Path, default=HERE / "results" / "lbfgs.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    ratio = recompute_ratio()
    configs: dict[str, TrainConfig] = {}
    for path in args.study:
        for cell in expand_cells(load_study(path)):
            configs.setdefault(workload_key(cell.config), cell.config)
    reference = resolve(TrainConfig(task="rotation", dataset="folder", data_dir=str(ROOT), **REFERENCE_NETWORK))
    configs.setdefault(workload_key(reference), reference)
    workloads = {}
    for index, (key, config) in enumerate(configs.items()):
        workloads[key] = measure_workload(config, ratio)
        print(f"[{index + 1}/{len(configs)}] {key}", file=sys.stderr)
    record = {
        "benchmark": "cost model inputs",
        "command": "benchmarks/bench_cost_inputs.py " + " ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                                                                for p in args.study),
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "flop_counting": "torch.utils.flop_counter.flop_registry: matmuls and convolutions, 2 FLOPs per multiply-add",
        "reference_workload": workload_key(reference),
        "reversible_recompute_ratio": ratio,
        "checkpoint_check": checkpoint_check(),
        "cpu_check": cpu_check(),
        "lbfgs": lbfgs_evaluations(args.lbfgs),
        "workloads": workloads,
        "seconds": time.perf_counter() - started,
    }
    atomic.write_json(args.out, record)
    print(json.dumps({"out": str(args.out), "workloads": len(workloads), "seconds": round(record["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
