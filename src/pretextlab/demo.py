"""`pretextlab demo`: the main job on a small embedded default, on a laptop's CPU in minutes.

Pretrain a small network with a pretext task (Rotation by default) on Fashion-MNIST, then judge
its frozen pre_logits with the study's main protocol (full-batch L-BFGS logistic regression) on
10,000 labelled training images, next to two baselines: the same network at random init, and raw
pixels. Prints a table and saves it (JSON, Markdown) with a training-curve plot (PNG).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretextlab import atomic
from pretextlab.config import TrainConfig, resolve
from pretextlab.data import augment, load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.probe_run import EvalConfig, PixelNetwork, evaluate_run, probe_representation
from pretextlab.training import Trainer, build_model, read_metrics
from pretextlab.training.knn_monitor import KNN_KS, knn_series

# Per task, settings that fit 2 CPU cores in a few minutes; everything else is the study's recipe.
DEMO_TRAINING: dict[str, dict[str, Any]] = {
    # RevNet50 "(-)" (no final ReLU, as the study's best pre-logits), 6 epochs on 20,000 images.
    # A schedule this short wants 3x the study's learning rate; channels_last is faster on CPU too,
    # and the memory-saving backward is off because at 32 px memory is not what limits a laptop.
    "rotation": dict(
        network="revnet50", width=2, final_relu=False, image_size=32, epochs=6, limit=20000, batch_size=64,
        base_lr=0.3, crop_scale=(0.6, 1.0), color_jitter=0.0, channels_last=True, reversible_backward=False,
        # The kNN monitor at the probed outputs each epoch (issue 17): the curve shows when pre_logits stop improving.
        monitor_outputs=("block2", "block3", "pre_logits"),
    ),
    "exemplar": dict(network="resnet50v1", width=1, image_size=32, epochs=2, batch_size=32, copies=4, crop_scale=(0.3, 1.0)),
    "jigsaw": dict(network="resnet50v1", width=1, image_size=56, epochs=2, batch_size=32, patch_size=16),
    "relative_patch": dict(network="resnet50v1", width=1, image_size=56, epochs=2, batch_size=32, patch_size=16),
}


@dataclass
class DemoConfig:
    task: str = "rotation"
    out: str = "demo-out"
    device: str = "auto"
    probe_labels_per_class: int = 1000  # 10,000 labelled images on Fashion-MNIST's 10 classes
    # The study probes every layer: at this scale the middle blocks hold the best features.
    outputs: tuple[str, ...] = ("block2", "block3", "pre_logits")
    val_size: int = 5000
    test_limit: int | None = None  # None: the whole 10,000-image test set
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # overrides of DEMO_TRAINING[task]


def demo_train_config(config: DemoConfig) -> TrainConfig:
    if config.task not in DEMO_TRAINING:
        raise PretextlabError(f"the demo knows no task {config.task!r}: choose one of {', '.join(DEMO_TRAINING)}")
    settings = {**DEMO_TRAINING[config.task], **config.training}
    return resolve(
        TrainConfig(
            task=config.task,
            dataset="fashion-mnist",
            val_size=config.val_size,
            seed=config.seed,
            device=config.device,
            val_batches=20,
            **settings,
        )
    )


def plot_training_curve(metrics: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if "loss" in m]
    vals = [m for m in metrics if m.get("val_pretext_accuracy_percent") is not None]
    knn = knn_series(metrics)
    fig, (ax_loss, ax_acc, *ax_knn) = plt.subplots(1, 3 if knn else 2, figsize=(15 if knn else 10, 3.8))
    ax_loss.plot([m["epoch"] for m in steps], [m["loss"] for m in steps], label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("pretext loss")
    ax_loss.set_title("pretext loss")
    ax_loss.legend()
    ax_acc.plot([m["epoch"] for m in steps], [m["pretext_accuracy_percent"] for m in steps], label="training batches")
    ax_acc.plot([m["epoch"] for m in vals], [m["val_pretext_accuracy_percent"] for m in vals], "o-", label="validation split")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("pretext accuracy (%)")
    ax_acc.set_title("pretext accuracy")
    ax_acc.legend()
    if knn:  # the kNN monitor (issue 17): is the representation still getting better?
        plot_knn_panel(ax_knn[0], knn)
    fig.suptitle(title)
    fig.tight_layout()
    atomic.write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    # The same figure as SVG beside the PNG (for a paper); no date in it, so a rerun changes nothing.
    atomic.write_bytes(path.with_suffix(".svg"), lambda handle: fig.savefig(handle, format="svg", metadata={"Date": None}))
    plt.close(fig)
    return path


def plot_knn_panel(ax: Any, series: dict[tuple[str, int], list[tuple[float, float]]]) -> None:
    """The kNN monitor's top-1 per output (a colour each), k=20 solid and k=200 dashed."""
    outputs = list(dict.fromkeys(output for output, _ in series))
    for (output, k), points in sorted(series.items()):
        ax.plot([e for e, _ in points], [v for _, v in points], "o-" if k == KNN_KS[0] else "s--",
                color=f"C{outputs.index(output)}", label=f"{output}, k={k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 on the validation split (%)")
    ax.set_title("kNN monitor (frozen features)")
    ax.legend(fontsize="small")


def demo_run_name(train_config: TrainConfig) -> str:
    """The pretrained network as the results table and the curve's title name it: "revnet50 (-) k=2"."""
    return f"{train_config.network}{'' if train_config.final_relu else ' (-)'} k={train_config.width or 1}"


def demo_markdown(task: str, summary: dict[str, Any], probe_images: int, table: list[str], total_seconds: float,
                  train_seconds: float, curve: Path) -> str:
    """demo_results.md: the curve named relative to the file itself (it lies beside it), so the text travels."""
    return "\n".join(
        [
            f"pretextlab demo: {task} on Fashion-MNIST, L-BFGS linear probe on {probe_images} labelled images",
            f"pretext accuracy on the validation split: {summary['val_pretext_accuracy_percent']:.2f}%",
            "",
            *table,
            "",
            f"total time {total_seconds / 60:.1f} min (training {train_seconds / 60:.1f} min); curve: {curve.name}",
        ]
    )


def run_demo(config: DemoConfig, progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(config.out)
    train_config = demo_train_config(config)
    run_dir = out / f"{config.task}-run"
    trainer = Trainer(train_config, run_dir, resume=True, progress=progress)
    summary = trainer.fit()
    train_seconds = time.perf_counter() - started

    eval_config = EvalConfig(
        outputs=tuple(config.outputs),
        labels_per_class=config.probe_labels_per_class,
        val_size=config.val_size,
        test_limit=config.test_limit,
        device=config.device,
        seed=config.seed,
    )
    pretrained = {r["output"]: r for r in evaluate_run(run_dir, eval_config, progress=progress)}

    # Baselines on exactly the same images and labels as the pretrained network's probe.
    splits = load_dataset(
        "fashion-mnist", data_dir=train_config.data_dir, image_size=train_config.decode_size, val_size=config.val_size,
        test_limit=config.test_limit, seed=config.seed,
    )
    torch.manual_seed(config.seed)
    random_network, random_task = build_model(dataclasses.replace(train_config))
    random_network.eval()
    random_init = probe_representation(
        random_network, random_task.eval_views, splits, tuple(config.outputs), out / "random-init" / "features",
        f"random-init-{train_config.config_hash()}", eval_config, progress=progress,
    )
    pixels = probe_representation(
        PixelNetwork(), lambda images: (augment.to_unit(images[:, :1]), 1), splits, ("pixels",),
        out / "pixels" / "features", f"pixels-{train_config.decode_size}",
        dataclasses.replace(eval_config, outputs=("pixels",)), progress=progress,
    )["pixels"]

    run_name = demo_run_name(train_config)
    rows = []
    for output in config.outputs:
        rows.append((f"{config.task}-pretrained {run_name}, {output}", pretrained[output]))
        rows.append((f"same network at random init, {output}", random_init[output]))
    rows.append(("raw pixels", pixels))
    table = [
        "| representation | dims | L2 chosen on val | val top-1 (%) | test top-1 (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        table.append(
            f"| {name} | {r['feature_dim']} | {r['chosen'].get('l2', 'n/a'):.0e} | {r['val_top1_percent']:.2f} | {r['test_top1_percent']:.2f} |"
        )
    curve = plot_training_curve(read_metrics(run_dir), out / "training_curve.png", f"{config.task} on Fashion-MNIST ({run_name})")
    total_seconds = time.perf_counter() - started
    report = {
        "task": config.task,
        "train_config": train_config.to_dict(),
        "pretext_val_accuracy": summary["val_pretext_accuracy_percent"],
        "probe_train_images": pixels["train_images"],
        "results": {"pretrained": pretrained, "random_init": random_init, "pixels": pixels},
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "training_curve": str(curve),
    }
    atomic.write_json(out / "demo_results.json", report)
    text = demo_markdown(config.task, summary, pixels["train_images"], table, total_seconds, train_seconds, curve)
    atomic.write_text(out / "demo_results.md", text + "\n")
    print(text, file=sys.stderr)  # for people; `pretextlab demo` prints the JSON report on stdout
    return report
