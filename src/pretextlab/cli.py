"""The one `pretextlab` command: networks, train, evaluate, export, demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pretextlab.errors import PretextlabError


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from pretextlab.config import TrainConfig
    from pretextlab.options import add_arguments

    # Generated from TrainConfig's fields: each option's type, default, choices, help and section live there.
    add_arguments(parser, TrainConfig)


def _train_config(args: argparse.Namespace):
    from pretextlab.config import TrainConfig
    from pretextlab.options import from_arguments

    return from_arguments(TrainConfig, args)


def _cmd_networks(args: argparse.Namespace) -> int:
    from pretextlab.models import networks_table

    print(networks_table(tuple(args.widths)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pretextlab.training import train

    summary = train(_train_config(args), args.out, resume=args.resume, progress=not args.no_progress, force=args.force)
    # stdout is the summary as JSON and nothing else, once per job: torchrun's rank 0 alone prints it.
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    return 0


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from pretextlab.evaluate.backbones import BackboneSpec
    from pretextlab.evaluate.probe_run import EvalConfig
    from pretextlab.options import add_arguments

    # One call, so the flags of both share one argument group per section (options.SECTIONS).
    add_arguments(parser, EvalConfig, BackboneSpec)


def _eval_config(args: argparse.Namespace):
    from pretextlab.evaluate.probe_run import EvalConfig
    from pretextlab.options import from_arguments

    # Every evaluate flag's dest is the EvalConfig field it sets, so the config is read from the
    # dataclass's own field list rather than a second list here.
    return from_arguments(EvalConfig, args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pretextlab.evaluate.backbones import BackboneSpec, evaluate_backbone
    from pretextlab.evaluate.probe_run import evaluate_run
    from pretextlab.options import from_arguments

    spec = from_arguments(BackboneSpec, args)
    if (args.run is None) == (spec.backbone is None):
        raise PretextlabError("evaluate needs exactly one of --run RUN_DIR or --backbone LIB:NAME (torchvision:resnet50, timm:resnet18)")
    backbone_only = [f"--{k.replace('_', '-')}" for k in ("weights", "image_size", "resize_size", "out") if getattr(spec, k) is not None]
    if args.run is not None and backbone_only:
        raise PretextlabError(f"{', '.join(backbone_only)} {'goes' if len(backbone_only) == 1 else 'go'} with --backbone; "
                              "a run's network, weights and directory are its own")
    if spec.backbone is not None:
        results = evaluate_backbone(spec, _eval_config(args), progress=not args.no_progress)
    else:
        results = evaluate_run(args.run, _eval_config(args), progress=not args.no_progress)
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports (and stored the results)
        return 0
    # People read the table on stderr; stdout is one JSON document for scripts.
    print(f"{'output':<12} {'dims':>6} {'probe':<7} {'labels':<8} {'val top-1 %':>11} {'test top-1 %':>12}  chosen", file=sys.stderr)
    for r in results:
        chosen = ", ".join(f"{k}={v:.0e}" if k == "l2" else f"{k}={v:g}" for k, v in r["chosen"].items() if isinstance(v, (int, float)))
        print(
            f"{r['output']:<12} {r['feature_dim']:>6} {r['probe']:<7} {r['labels']:<8} {r['val_top1_percent']:>11.2f} "
            f"{r['test_top1_percent']:>12.2f}  {chosen}",
            file=sys.stderr,
        )
    fields = ("output", "probe", "labels", "feature_dim", "val_top1_percent", "test_top1_percent", "chosen",
              "train_images", "val_images", "test_images", "warnings", "result_file")
    print(json.dumps({
        "run": None if args.run is None else str(args.run),
        **({"backbone": spec.backbone} if spec.backbone is not None else {}),
        "checkpoint": results[0]["checkpoint"] if results else None,
        # SGD-trained probes also say which recipe (--sgd-preset) and splits made their number.
        "results": [{**{k: r.get(k) for k in fields}, **{k: r[k] for k in ("sgd_preset", "train_split", "val_split") if k in r}}
                    for r in results],
    }, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from pretextlab.models.export import export_network, record_path
    from pretextlab.training import load_trained_identity

    config, network, _, identity = load_trained_identity(args.run)
    # Issue 17 item 3: every export names the very checkpoint its weights are (step, SHA-256).
    provenance = {"run": os.path.abspath(args.run), "config_hash": config.config_hash(), "task": config.task,
                  "checkpoint": dataclasses.asdict(identity)}
    record = export_network(network, args.format, args.out, provenance)
    sidecar = str(record_path(args.out))
    print(f"wrote {args.out} ({args.format}; {record['load']}) and {sidecar}", file=sys.stderr)
    print(json.dumps({"run": str(args.run), "format": args.format, "out": str(args.out), "record": sidecar,
                      "network": record["network"], "target": record.get("target"), "checkpoint": provenance["checkpoint"]}, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pretextlab.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(task=args.task, out=args.out, device=args.device), progress=not args.no_progress)
    print(json.dumps(report))  # stdout is for machines; the table went to stderr
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from pretextlab.study import load_study, run_study

    if args.cost and not args.dry_run:
        raise PretextlabError("--cost only estimates, it runs nothing: use it with --dry-run")
    study = load_study(args.file, out=args.out)
    # People read the status tables on stderr; stdout is one JSON line for scripts.
    outcome = run_study(study, executor=args.executor, dry_run=args.dry_run, wait=not args.no_wait,
                        progress=not args.no_progress, echo=lambda line: print(line, file=sys.stderr))
    counts = {state: sum(1 for s in outcome.statuses if s.state == state) for state in ("done", "running", "left")}
    shown = {"study": study.name, "directory": str(study.directory), "dry_run": args.dry_run,
             "cells": len(outcome.statuses), **counts, "job_ids": outcome.job_ids, "errors": outcome.errors}
    if outcome.jobs is not None:
        shown["jobs"] = outcome.jobs
    if args.cost:
        from pretextlab.study.cost import format_cost, study_cost

        shown["cost"] = study_cost(study, [s.cell for s in outcome.statuses], args.cost_inputs, args.device_check)
        print(format_cost(shown["cost"]), file=sys.stderr)
    print(json.dumps(shown))
    return 0 if outcome.ok else 1


def _cmd_results(args: argparse.Namespace) -> int:
    from pretextlab import atomic
    from pretextlab.report import format_chosen
    from pretextlab.study.store import ResultsStore
    from pretextlab.study import locate_study_store

    with ResultsStore(locate_study_store(args.file), read_only=True) as store:
        if args.csv is not None:
            text = store.probes_csv()
            if args.csv == "-":
                sys.stdout.write(text)
            else:
                atomic.write_text(args.csv, text)
                print(f"wrote {len(text.splitlines()) - 1} probe results to {args.csv}", file=sys.stderr)
            return 0
        percent = lambda value, width: f"{'—' if value is None else f'{value:.2f}':>{width}}"  # noqa: E731
        runs = store.runs()
        print(f"{'hash':<12} {'task':<15} {'network':<15} {'k':>3} {'size':>5} {'status':<11} {'pretext %':>9}")
        for r in runs:
            print(f"{r['config_hash']:<12} {r['task']:<15} {r['network']:<15} {r['width']:>3} {r['representation_size'] or '':>5} "
                  f"{r['status']:<11} {percent(r['pretext_val_accuracy_percent'], 9)}")
        print()
        print(f"{'hash':<12} {'dataset':<14} {'output':<11} {'probe':<6} {'labels':<8} {'val %':>6} {'test %':>6}  chosen")
        for p in store.probes():
            print(f"{p['config_hash']:<12} {p['dataset']:<14} {p['output']:<11} {p['probe']:<6} {p['labels']:<8} "
                  f"{percent(p['val_top1_percent'], 6)} {percent(p['test_top1_percent'], 6)}  {format_chosen(p['chosen'])}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pretextlab.report import build_report
    from pretextlab.report.build import build_backbone_report
    from pretextlab.report.data import is_backbone_dir
    from pretextlab.study import locate_study_store

    if is_backbone_dir(args.file):  # `evaluate --backbone`'s --out: a report of backbones alone
        report = build_backbone_report([args.file, *args.backbones], args.out)
    else:
        report = build_report(locate_study_store(args.file), args.out, main_output=args.main_output,
                              main_probe=args.main_probe, pdf=args.pdf, backbones=args.backbones)
    print(f"wrote {report.markdown} and {report.html} ({len(report.figures)} figures)", file=sys.stderr)
    shown = {"markdown": str(report.markdown), "html": str(report.html), "figures": len(report.figures),
             "empty_figures": len(report.empty_figures), "missing_cells": report.missing_cells}
    if args.screenshot:
        from pretextlab.report.browser import take_screenshot

        # After the report is written: a missing browser costs the picture, never the report.
        shown["screenshot"] = str(take_screenshot(report.html, args.screenshot))
        print(f"wrote {shown['screenshot']} (report.html in headless Chromium)", file=sys.stderr)
    print(json.dumps(shown))
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
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed config (differences are recorded)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="probe a trained run's (or a torchvision/timm backbone's) frozen features")
    p.add_argument("--run", default=None, help="a train run directory (or --backbone instead)")
    # Generated from EvalConfig's fields: each option's type, default, choices and help live there.
    _add_eval_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="a trained run's network as torchvision / timm weights or a safetensors file")
    p.add_argument("run", help="a train run directory")
    p.add_argument("--format", required=True, choices=("torchvision", "timm", "safetensors"),
                   help="torchvision / timm: that library's resnet50 (resnet50v1 k=4) or vgg19_bn features (vgg19bn k=8) "
                        "key layout; safetensors: any network, loaded back with pretextlab.models.load_exported")
    p.add_argument("--out", required=True, help="the file to write (.pth, or .safetensors); its record goes beside it as FILE.json")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="Rotation on Fashion-MNIST, then the L-BFGS probe against two baselines")
    p.add_argument("--task", default="rotation")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("study", help="run a study's grid (a YAML file): skip what is done, resume what was interrupted")
    p.add_argument("file", help="the study file, e.g. configs/mini-fashion.yaml")
    p.add_argument("--dry-run", action="store_true", help="only show what is done / running / left")
    p.add_argument("--cost", action="store_true",
                   help="with --dry-run: each cell's GPU-hours, checkpoint and feature-cache bytes, probe memory (docs/scale.md)")
    p.add_argument("--cost-inputs", default=None, metavar="JSON",
                   help="the measured inputs of --cost (default: benchmarks/results/cost_inputs.json)")
    p.add_argument("--device-check", default=None, metavar="JSON",
                   help="measured GPU throughput for --cost (default: benchmarks/results/device_check.json when it exists)")
    p.add_argument("--executor", choices=("inline", "local", "slurm"), default=None,
                   help="inline: one cell after another here; local/slurm: parallel jobs through submitit (default: the study file's)")
    p.add_argument("--out", default=None, help="the study directory (default: the study file's out, else runs/studies/NAME)")
    p.add_argument("--no-wait", action="store_true", help="local/slurm: submit the jobs and return")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("results", help="list a study's runs and probe results, or export them as CSV")
    p.add_argument("file", help="a study file, a study directory or its results.sqlite")
    p.add_argument("--csv", nargs="?", const="-", default=None, metavar="PATH", help="write CSV to PATH (or stdout)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("report", help="the study's tables and figures (Markdown + HTML; figures as PNG and SVG) from its results store")
    p.add_argument("file", help="a study file, a study directory or its results.sqlite (or an `evaluate --backbone` --out directory)")
    p.add_argument("--out", required=True, help="directory for report.md, report.html and the figures")
    p.add_argument("--backbones", nargs="+", default=[], metavar="DIR",
                   help="also tabulate the results of `evaluate --backbone ... --out DIR` (torchvision/timm networks)")
    p.add_argument("--main-output", default="pre_logits", help="the output the main table and width plots read")
    p.add_argument("--main-probe", default="lbfgs", help="the probe the main table and width plots read")
    p.add_argument("--pdf", action="store_true", help="also write each figure as PDF (PNG and SVG are always written)")
    p.add_argument("--screenshot", metavar="PNG", default=None,
                   help="also write a PNG of report.html's first screen as headless Chromium draws it (needs chromium, "
                        "chromedriver and selenium: setup.sh)")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from pretextlab.training import Preempted

    try:
        return args.func(args)
    except Preempted as stopped:
        print(f"pretextlab: {stopped}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a job scheduler expects from a preempted job
    except PretextlabError as error:
        print(f"pretextlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretextlab: interrupted; finished work is kept (resume a run with --resume)", file=sys.stderr)
        return 130
