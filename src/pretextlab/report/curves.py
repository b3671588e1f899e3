"""The report's training-curve figures: SGD probe convergence, pretext training accuracy and the kNN monitor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretextlab.report.data import TASK_TITLES, StudyData
from pretextlab.report.document import MISSING, Cell
from pretextlab.report.figures import (
    FigureResult,
    FigureStyle,
    _label_panel,
    _outside_legend,
    _panels,
    _placeholder,
    _run_line,
    _save,
    _style,
)
from pretextlab.report.tables import data_table, percent_text
from pretextlab.training.knn_monitor import KNN_KS, parse_knn_field

# Keys a probe record may keep its per-epoch curve under, and the accuracy keys inside a point with
# the factor to percent (records before the unit-suffixed names held fractions under "val_top1").
CURVE_KEYS = ("curve", "history", "per_epoch")
CURVE_ACCURACY_KEYS = (("val_top1_percent", 1.0), ("val_top1", 100.0))
# Pretext accuracy metric names in metrics.jsonl (percent under both the old and the unit-suffixed names).
PRETEXT_TRAIN_NAMES = ("pretext_accuracy_percent", "pretext_accuracy")
PRETEXT_VAL_NAMES = ("val_pretext_accuracy_percent", "val_pretext_accuracy")
# Two outputs of one run in one SGD panel: same colour and marker, told apart by the marker's fill.
FILLS = ("full", "none", "left", "bottom", "right", "top")
# The kNN monitor's outputs of one run in one panel: told apart by the line (first output solid).
OUTPUT_LINES = ("-", "--", ":", "-.")


def _curve(record: dict[str, Any]) -> list[tuple[float, float]]:
    for key in CURVE_KEYS:
        points = record.get(key)
        if isinstance(points, list) and points:
            curve = []
            for point in points:
                if not isinstance(point, dict) or "epoch" not in point:
                    continue
                for accuracy, to_percent in CURVE_ACCURACY_KEYS:
                    if isinstance(point.get(accuracy), (int, float)):
                        curve.append((float(point["epoch"]), to_percent * float(point[accuracy])))
                        break
            if curve:
                return curve
    return []


def figure_sgd_convergence(data: StudyData, dataset: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: SGD linear probe convergence (dashed: L-BFGS on the same features)"
    style = _style(data, style)
    curves = []
    for row in data.probes:
        if row["dataset"] == dataset and row["probe"] == "sgd" and row["labels"] == "all":
            curve = _curve(row["record"])
            if curve:
                curves.append((row, curve))
    if not curves:
        checks = _placeholder(path, title, "probe training epoch", "validation top-1 (%)",
                              f"no SGD probe results with a per-epoch curve on {dataset} yet", style)
        return FigureResult("sgd_convergence", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[r["config_hash"]]["task"] == t for r, _ in curves)]
    figure, axes = _panels(len(tasks), width=5.0, height=3.8)
    for ax, task in zip(axes, tasks):
        mine = [(r, c) for r, c in curves if data.runs[r["config_hash"]]["task"] == task]
        outputs: dict[str, list[str]] = {}
        for row, curve in mine:
            run = data.runs[row["config_hash"]]
            run_style = style.of(run)
            seen = outputs.setdefault(row["config_hash"], [])
            seen.append(row["output"])
            ax.plot([e for e, _ in curve], [v for _, v in curve], color=run_style.color, marker=run_style.marker,
                    fillstyle=FILLS[(len(seen) - 1) % len(FILLS)], gid=f"run-{row['config_hash']}",
                    label=f"{run_style.label} {row['output']}")
            lbfgs = data.result(row["config_hash"], dataset, row["output"], "lbfgs")
            if lbfgs is not None and lbfgs["val_top1_percent"] is not None:
                ax.axhline(lbfgs["val_top1_percent"], color=run_style.color, linestyle="--", linewidth=1)
        _label_panel(ax, TASK_TITLES.get(task, task), "probe training epoch", "validation top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = []
    for row, curve in curves:
        lbfgs = data.result(row["config_hash"], dataset, row["output"], "lbfgs")
        rows.append([Cell(data.run_label(row["config_hash"])), Cell(row["output"]), Cell(f"{curve[-1][0]:g}"),
                     Cell(percent_text(row["val_top1_percent"]), link=row["config_hash"]),
                     Cell(percent_text(lbfgs["val_top1_percent"]) if lbfgs else MISSING, link=row["config_hash"] if lbfgs else None)])
    return FigureResult("sgd_convergence", title, path, len(curves),
                        data_table(["run", "output", "epochs", "SGD val %", "L-BFGS val %"], rows), checks=checks)


def _knn_curves(data: StudyData) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per run, each monitored output's kNN top-1 (k=20, percent) by epoch."""
    by_run: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for point in data.curves:
        key = parse_knn_field(point["name"])
        if key is not None and key[1] == KNN_KS[0] and point["epoch"] is not None:
            by_run.setdefault(point["config_hash"], {}).setdefault(key[0], []).append((point["epoch"], point["value"]))
    return by_run


def _draw_knn(ax: Any, data: StudyData, style: FigureStyle, task: str, knn: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
    outputs = list(dict.fromkeys(o for h, series in knn.items() if data.runs[h]["task"] == task for o in series))
    for config_hash, series in knn.items():
        if data.runs[config_hash]["task"] == task:
            for output, points in series.items():
                points = sorted(points)
                _run_line(ax, style.of(data.runs[config_hash]), config_hash, [e for e, _ in points], [v for _, v in points],
                          label=False, linestyle=OUTPUT_LINES[outputs.index(output) % len(OUTPUT_LINES)], markersize=4)
    lines = ", ".join(f"{o} {OUTPUT_LINES[i % len(OUTPUT_LINES)]}" for i, o in enumerate(outputs))
    _label_panel(ax, f"kNN monitor, k={KNN_KS[0]} ({lines})", "epoch", "kNN top-1, validation split (%)")


def figure_pretext_training(data: StudyData, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = "Pretext training: accuracy on the training batches (lines) and on the held-out split (dots)"
    style = _style(data, style)
    by_run: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for point in data.curves:
        kind = "train" if point["name"] in PRETEXT_TRAIN_NAMES else "val" if point["name"] in PRETEXT_VAL_NAMES else None
        if kind is not None and point["epoch"] is not None:
            by_run.setdefault(point["config_hash"], {}).setdefault(kind, []).append((point["epoch"], point["value"]))
    if not by_run:
        checks = _placeholder(path, title, "epoch", "pretext accuracy (%)", "no pretext training curves recorded yet", style)
        return FigureResult("pretext_training", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[h]["task"] == t for h in by_run)]
    knn = _knn_curves(data)
    figure, axes = _panels(len(tasks), height=6.8 if knn else 3.4)
    if knn:  # a second row: the kNN monitor (issue 17) under each task's pretext accuracy
        figure.clear()
        grid = figure.subplots(2, len(tasks), squeeze=False)
        axes = list(grid[0])
        for ax, task in zip(grid[1], tasks):
            _draw_knn(ax, data, style, task, knn)
        title += "; below: the kNN monitor on frozen features"
    for ax, task in zip(axes, tasks):
        for config_hash, series in by_run.items():
            if data.runs[config_hash]["task"] != task:
                continue
            run_style = style.of(data.runs[config_hash])
            train = sorted(series.get("train", []))
            val = sorted(series.get("val", []))
            if train:
                # A few markers on the training line, so its legend entry shows the run's marker too.
                _run_line(ax, run_style, config_hash, [e for e, _ in train], [v for _, v in train], alpha=0.8,
                          markevery=max(1, len(train) // 5), markersize=4)
            if val:
                _run_line(ax, run_style, config_hash, [e for e, _ in val], [v for _, v in val], line=False, label=not train,
                          markeredgecolor="black", markeredgewidth=0.5)
        _label_panel(ax, TASK_TITLES.get(task, task), "epoch", "pretext accuracy (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = []
    for config_hash, series in by_run.items():
        val = sorted(series.get("val", []))
        if val:
            rows.append([Cell(data.run_label(config_hash)), Cell(f"{val[-1][0]:.2f}"), Cell(f"{val[-1][1]:.1f}", link=config_hash)])
    return FigureResult("pretext_training", title, path, len(by_run),
                        data_table(["run", "epoch", "final val pretext %"], rows), checks=checks)
