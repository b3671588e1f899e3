"""The report's accuracy figures (by output, by width, pretext vs downstream, linear vs MLP, few labels,
width x representation size), each a PNG plus the table of the numbers it draws."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter, ScalarFormatter

from pretextlab import atomic
from pretextlab.report.data import OUTPUT_ORDER, TASK_TITLES, StudyData
from pretextlab.report.document import MISSING, Block, Cell
from pretextlab.report.tables import data_table, percent_text

FIGURE_DPI = 110


@dataclass
class FigureResult:
    name: str
    title: str
    path: Path
    points: int  # data points drawn; 0 = a placeholder saying what is missing
    table: Block | None = None
    note: str = ""
    checks: dict[str, Any] = field(default_factory=dict)  # title, axis labels, legends (from _save)


def _save(figure: Figure, path: Path) -> dict[str, Any]:
    """Write the PNG; returns what it shows (title, each plot's axis labels and legend) for checking."""
    atomic.write_bytes(path, lambda handle: figure.savefig(handle, format="png", dpi=FIGURE_DPI, bbox_inches="tight"))
    colorbars = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]
    plots = [ax for ax in figure.axes if ax not in colorbars]
    return {
        "title": figure.get_suptitle() or " / ".join(ax.get_title() for ax in plots),
        "axes": [
            {"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "legend": ax.get_legend() is not None or bool(colorbars)}
            for ax in plots
        ],
    }


def _placeholder(path: Path, title: str, xlabel: str, ylabel: str, reason: str) -> dict[str, Any]:
    figure = Figure(figsize=(6.4, 3.2), layout="constrained")
    axes = figure.subplots()
    axes.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=axes.transAxes, color="#777")
    axes.plot([], [], label="no finished results yet")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


def _label_panel(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """One panel's title, axis labels, grid and legend, the same on every per-task figure."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _panels(count: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(max(width * count, 5.0), height), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    return figure, list(axes)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _markers(names: Sequence[str]) -> dict[str, str]:
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(names)}


def figure_by_output(data: StudyData, dataset: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 by output (largest width per network)"
    colors = _colors(data.networks)
    series: dict[tuple[str, str], list[tuple[str, float, str]]] = {}
    for task in data.tasks:
        for network in data.networks:
            run = data.find_run(task, network, data.largest_width(network))
            if run is None:
                continue
            for output in OUTPUT_ORDER:
                result = data.result(run["config_hash"], dataset, output, probe)
                if result is not None:
                    series.setdefault((task, network), []).append((output, result["test_top1_percent"], run["config_hash"]))
    outputs = [o for o in OUTPUT_ORDER if any(o == p[0] for s in series.values() for p in s)]
    points = sum(len(s) for s in series.values())
    if not points:
        checks = _placeholder(path, title, "output", "test top-1 (%)", f"no {probe} results on {dataset} yet")
        return FigureResult("by_output", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(k[0] == t for k in series)]
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for network in data.networks:
            pts = series.get((task, network))
            if pts:
                ax.plot([outputs.index(o) for o, _, _ in pts], [v for _, v, _ in pts], "o-", color=colors[network],
                        label=f"{network} k={data.largest_width(network)}")
        ax.set_xticks(range(len(outputs)), outputs, rotation=30, ha="right")
        _label_panel(ax, TASK_TITLES.get(task, task), "output", "test top-1 (%)")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(task), Cell(network), Cell(o), Cell(percent_text(v), link=h)] for (task, network), pts in series.items() for o, v, h in pts]
    return FigureResult("by_output", title, path, points, data_table(["task", "network", "output", "test top-1 %"], rows), checks=checks)


def figure_by_width(data: StudyData, dataset: str, output: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 at {output} by widening factor k"
    colors = _colors(data.networks)
    series: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for run in sorted(data.natural_runs(), key=lambda r: r["width"]):
        result = data.result(run["config_hash"], dataset, output, probe)
        if result is not None:
            series.setdefault((run["task"], run["network"]), []).append((run["width"], result["test_top1_percent"], run["config_hash"]))
    points = sum(len(s) for s in series.values())
    if not points:
        checks = _placeholder(path, title, "widening factor k", "test top-1 (%)", f"no {probe} results at {output} on {dataset} yet")
        return FigureResult("by_width", title, path, 0, checks=checks)
    widths = sorted({w for s in series.values() for w, _, _ in s})
    tasks = [t for t in data.tasks if any(k[0] == t for k in series)]
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for network in data.networks:
            pts = series.get((task, network))
            if pts:
                ax.plot([w for w, _, _ in pts], [v for _, v, _ in pts], "o-", color=colors[network], label=network)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        _label_panel(ax, TASK_TITLES.get(task, task), "widening factor k", "test top-1 (%)")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(percent_text(v), link=h)] for (t, n), pts in series.items() for w, v, h in pts]
    return FigureResult("by_width", title, path, points, data_table(["task", "network", "k", "test top-1 %"], rows), checks=checks)


def figure_pretext_vs_downstream(data: StudyData, dataset: str, output: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: pretext accuracy against {probe} test top-1 at {output} (marker size = k)"
    colors = _colors(data.networks)
    points: list[tuple[dict[str, Any], float]] = []
    for run in data.natural_runs():
        result = data.result(run["config_hash"], dataset, output, probe)
        if result is not None and run["pretext_val_accuracy_percent"] is not None:
            points.append((run, result["test_top1_percent"]))
    if not points:
        checks = _placeholder(path, title, "pretext validation accuracy (%)", "test top-1 (%)", "no finished runs with both numbers yet")
        return FigureResult("pretext_vs_downstream", title, path, 0, checks=checks)
    widths = sorted({run["width"] for run, _ in points})
    size = lambda w: 25 + 175 * (w - widths[0]) / max(widths[-1] - widths[0], 1)  # noqa: E731
    tasks = [t for t in data.tasks if any(run["task"] == t for run, _ in points)]
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        shown = set()
        for run, value in points:
            if run["task"] != task:
                continue
            label = run["network"] if run["network"] not in shown else None
            shown.add(run["network"])
            ax.scatter(run["pretext_val_accuracy_percent"], value, s=size(run["width"]), color=colors[run["network"]],
                       alpha=0.75, edgecolors="black", linewidths=0.5, label=label)
        handles, labels = ax.get_legend_handles_labels()
        for w in widths:
            handles.append(Line2D([], [], marker="o", linestyle="", color="gray", markersize=math.sqrt(size(w))))
            labels.append(f"k={w}")
        ax.legend(handles, labels, fontsize="small")
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("pretext validation accuracy (%)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [
        [Cell(r["task"]), Cell(r["network"]), Cell(str(r["width"])), Cell(f"{r['pretext_val_accuracy_percent']:.1f}", link=r["config_hash"]),
         Cell(percent_text(v), link=r["config_hash"])]
        for r, v in points
    ]
    return FigureResult("pretext_vs_downstream", title, path, len(points),
                        data_table(["task", "network", "k", "pretext val %", "test top-1 %"], rows), checks=checks)


def figure_linear_vs_mlp(data: StudyData, dataset: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: linear ({probe}) against MLP probe, test top-1"
    colors = _colors(data.tasks)
    markers = _markers(data.networks)
    pairs = []
    for row in data.probes:
        if row["dataset"] == dataset and row["probe"] == "mlp" and row["labels"] == "all":
            linear = data.result(row["config_hash"], dataset, row["output"], probe)
            if linear is not None:
                pairs.append((row, linear["test_top1_percent"], row["test_top1_percent"]))
    if not pairs:
        checks = _placeholder(path, title, f"linear ({probe}) test top-1 (%)", "MLP test top-1 (%)", f"no run has both {probe} and mlp results on {dataset} yet")
        return FigureResult("linear_vs_mlp", title, path, 0, checks=checks)
    figure = Figure(figsize=(5.6, 4.6), layout="constrained")
    ax = figure.subplots()
    for row, linear, mlp in pairs:
        ax.scatter(linear, mlp, color=colors[row["task"]], marker=markers[row["network"]], s=45,
                   edgecolors="black", linewidths=0.4)
    values = [v for _, a, b in pairs for v in (a, b)]
    low, high = min(values) - 2, max(values) + 2
    ax.plot([low, high], [low, high], "--", color="gray", linewidth=1)
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[t], label=TASK_TITLES.get(t, t))
               for t in data.tasks if any(r["task"] == t for r, _, _ in pairs)]
    handles += [Line2D([], [], marker=markers[n], linestyle="", color="gray", label=n)
                for n in data.networks if any(r["network"] == n for r, _, _ in pairs)]
    handles.append(Line2D([], [], linestyle="--", color="gray", label="equal accuracy"))
    ax.legend(handles=handles, fontsize="small")
    ax.set_xlabel(f"linear ({probe}) test top-1 (%)")
    ax.set_ylabel("MLP test top-1 (%)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    checks = _save(figure, path)
    rows = [[Cell(data.run_label(r["config_hash"])), Cell(r["output"]), Cell(percent_text(a), link=r["config_hash"]),
             Cell(percent_text(b), link=r["config_hash"])] for r, a, b in pairs]
    return FigureResult("linear_vs_mlp", title, path, len(pairs), data_table(["run", "output", "linear %", "MLP %"], rows), checks=checks)


def figure_few_labels(data: StudyData, dataset: str, output: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 at {output} against the number of labelled images"
    series: dict[str, list[tuple[int, float, str]]] = {}
    for row in data.probes:
        if (row["dataset"], row["output"], row["probe"]) == (dataset, output, probe) and row["train_images"]:
            series.setdefault(row["config_hash"], []).append((row["train_images"], row["test_top1_percent"], row["labels"]))
    series = {h: sorted(s) for h, s in series.items() if len(s) >= 2 and data.runs[h]["representation_size"] is None}
    if not series:
        checks = _placeholder(path, title, "labelled training images", "test top-1 (%)", f"no run has {probe} results at two label budgets yet")
        return FigureResult("few_labels", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[h]["task"] == t for h in series)]
    colors = _colors(data.networks)
    widths = sorted({data.runs[h]["width"] for h in series})
    styles = {w: s for w, s in zip(widths, ("-", "--", ":", "-.") * 4)}
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for config_hash, pts in series.items():
            run = data.runs[config_hash]
            if run["task"] != task:
                continue
            ax.plot([n for n, _, _ in pts], [v for _, v, _ in pts], marker="o", linestyle=styles[run["width"]],
                    color=colors[run["network"]], label=f"{run['network']} k={run['width']}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        _label_panel(ax, TASK_TITLES.get(task, task), "labelled training images (log)", "test top-1 (%)")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(data.run_label(h)), Cell(tag), Cell(str(n)), Cell(percent_text(v), link=h)] for h, pts in series.items() for n, v, tag in pts]
    return FigureResult("few_labels", title, path, sum(len(s) for s in series.values()),
                        data_table(["run", "labels", "images", "test top-1 %"], rows), checks=checks)


def figure_width_by_size(data: StudyData, dataset: str, output: str, probe: str, path: Path) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 at {output}, widening factor x representation size"
    combos: dict[tuple[str, str], dict[tuple[int, int], tuple[float, str]]] = {}
    for run in data.runs.values():
        if run["representation_size"] is None:
            continue
        result = data.result(run["config_hash"], dataset, output, probe)
        if result is not None:
            combos.setdefault((run["task"], run["network"]), {})[(run["width"], run["representation_size"])] = (
                result["test_top1_percent"], run["config_hash"])
    if not combos:
        checks = _placeholder(path, title, "representation size", "widening factor k", "no representation-size runs have finished yet")
        return FigureResult("width_by_representation", title, path, 0, checks=checks)
    figure, axes = _panels(len(combos), width=4.8, height=3.8)
    for ax, ((task, network), cells) in zip(axes, combos.items()):
        widths = sorted({w for w, _ in cells})
        sizes = sorted({s for _, s in cells})
        grid = [[cells[(w, s)][0] if (w, s) in cells else math.nan for s in sizes] for w in widths]
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        finite = [v for row in grid for v in row if not math.isnan(v)]
        middle = (min(finite) + max(finite)) / 2
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                # Dark text on the bright (high) end of viridis, white on the dark end.
                color = "black" if not math.isnan(value) and value > middle else "white"
                ax.text(j, i, MISSING if math.isnan(value) else f"{value:.1f}", ha="center", va="center", color=color, fontsize="small")
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_yticks(range(len(widths)), [str(w) for w in widths])
        ax.set_xlabel("representation size")
        ax.set_ylabel("widening factor k")
        ax.set_title(f"{TASK_TITLES.get(task, task)}, {network}")
        figure.colorbar(image, ax=ax, label="test top-1 (%)")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(str(s)), Cell(percent_text(v), link=h)]
            for (t, n), cells in combos.items() for (w, s), (v, h) in sorted(cells.items())]
    return FigureResult("width_by_representation", title, path, len(rows),
                        data_table(["task", "network", "k", "size", "test top-1 %"], rows),
                        note="The colour bar is the heat map's legend.", checks=checks)
