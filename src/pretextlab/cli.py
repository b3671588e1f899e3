"""The one `pretextlab` command: networks, train, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pretextlab.errors import PretextlabError


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from pretextlab.config import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--task", default=defaults.task, help="rotation, exemplar, jigsaw or relative_patch")
    parser.add_argument("--network", default=defaults.network, help="resnet50v1, resnet50v2, revnet50 or vgg19bn")
    parser.add_argument("--width", type=int, default=None, help="widening factor k (default 4; 8 for vgg19bn)")
    parser.add_argument("--no-final-relu", action="store_true", help='the "(-)" variant: no ReLU before pooling (v2, RevNet)')
    parser.add_argument("--representation-size", type=int, default=None, help="a linear layer makes pre_logits this size")
    parser.add_argument("--dataset", default=defaults.dataset, help="fashion-mnist or folder (ROOT/train/<class>/*, ROOT/val/<class>/*)")
    parser.add_argument("--data-dir", default=None, help="where the dataset lives")
    parser.add_argument("--image-size", type=int, default=None, help="network input side (default 224 for folder, 32 for fashion-mnist)")
    parser.add_argument("--limit", type=int, default=None, help="use a class-balanced subset of N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use a class-balanced subset of N test images")
    parser.add_argument("--val-size", type=float, default=None, help="held-out validation images (count, or fraction < 1)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="epochs (the schedule keeps the study's proportions)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the study's per task)")
    parser.add_argument("--base-lr", type=float, default=defaults.base_lr, help="learning rate at a batch of 256 images")
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--decay-epochs", type=float, nargs="*", default=None)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=list(defaults.crop_scale), metavar=("MIN", "MAX"))
    parser.add_argument("--color-jitter", type=float, default=defaults.color_jitter)
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="patch side for jigsaw/relative_patch (64 = the study)")
    parser.add_argument("--copies", type=int, default=defaults.copies, help="exemplar copies per image")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data loader processes (decoding only)")
    parser.add_argument("--precision", default=defaults.precision, help="auto (bf16 on GPU), fp32 or bf16")
    parser.add_argument("--val-batches", type=int, default=None, help="cap on validation batches scored per epoch")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")


def _train_config(args: argparse.Namespace):
    from pretextlab.config import TrainConfig

    return TrainConfig(
        task=args.task,
        network=args.network,
        width=args.width,
        final_relu=not args.no_final_relu,
        representation_size=args.representation_size,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        limit=args.limit,
        test_limit=args.test_limit,
        val_size=args.val_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        base_lr=args.base_lr,
        warmup_epochs=args.warmup_epochs,
        decay_epochs=tuple(args.decay_epochs) if args.decay_epochs is not None else None,
        weight_decay=args.weight_decay,
        crop_scale=tuple(args.crop_scale),
        color_jitter=args.color_jitter,
        patch_size=args.patch_size,
        copies=args.copies,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        precision=args.precision,
        val_batches=args.val_batches,
        checkpoint_every=args.checkpoint_every,
    )


def _cmd_networks(args: argparse.Namespace) -> int:
    from pretextlab.models import networks_table

    print(networks_table(tuple(args.widths)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pretextlab.train import train

    summary = train(_train_config(args), args.out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    return 0


def _eval_config(args: argparse.Namespace):
    from pretextlab.evaluate.probe_run import EvalConfig

    return EvalConfig(
        outputs=tuple(args.output),
        probe=args.probe,
        dataset=args.dataset,
        data_dir=args.data_dir,
        val_size=args.val_size,
        limit=args.limit,
        test_limit=args.test_limit,
        labels_per_class=args.labels_per_class,
        label_fraction=args.label_fraction,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pretextlab.evaluate.probe_run import evaluate_run

    results = evaluate_run(args.run, _eval_config(args), progress=not args.no_progress)
    print(f"{'output':<12} {'probe':<7} {'labels':<8} {'val top-1':>9} {'test top-1':>10}  chosen")
    for r in results:
        print(f"{r['output']:<12} {r['probe']:<7} {r['labels']:<8} {r['val_top1']:>9.2f} {r['test_top1']:>10.2f}  {r['chosen']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pretextlab.demo import DemoConfig, run_demo

    run_demo(DemoConfig(task=args.task, out=args.out, device=args.device), progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretextlab",
        description="Self-supervised pretext tasks on ResNet/RevNet/VGG at any width, judged by probes on frozen features.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("networks", help="table of every network: parameters and pre-logits size by width")
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8, 12, 16])
    p.set_defaults(func=_cmd_networks)

    p = sub.add_parser("train", help="pretrain a network with a pretext task")
    _add_train_arguments(p)
    p.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="probe a trained run's frozen features")
    p.add_argument("--run", required=True, help="a train run directory")
    p.add_argument("--output", nargs="+", default=["pre_logits"], help="named outputs (block1..., pre_logits) or all")
    p.add_argument("--probe", default="lbfgs", help="lbfgs")
    p.add_argument("--dataset", default=None, help="downstream dataset (default: the run's own)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val-size", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="class-balanced subset of N downstream training images")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--labels-per-class", type=int, default=None, help="few labels: N labelled images per class")
    p.add_argument("--label-fraction", type=float, default=None, help="few labels: this fraction of the labels")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="Rotation on Fashion-MNIST, then the L-BFGS probe against two baselines")
    p.add_argument("--task", default="rotation")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PretextlabError as error:
        print(f"pretextlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretextlab: interrupted; finished work is kept (resume a run with --resume)", file=sys.stderr)
        return 130
