"""The report's accuracy figures (by output, by width, pretext vs downstream, linear vs MLP, few labels,
width x representation size), each a PNG and an SVG (and a PDF on request) plus the table of the numbers it draws.

Every run is drawn in its one style (colour by network, marker by k and representation size) in every
panel of every figure of a report, and each figure has one legend outside its plots (issue 20)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib import rc_context
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter, ScalarFormatter

from pretextlab import atomic
from pretextlab.report.data import OUTPUT_ORDER, TASK_TITLES, StudyData
from pretextlab.report.document import MISSING, Block, Cell
from pretextlab.report.tables import data_table, percent_text

FIGURE_DPI = 110
# tab10 without its grey (grey is for reference lines), then tab20's lighter shades: 19 colours
# a reader can tell apart, enough for every network the paper names and more.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", ":", "-.")
# Vector files without a creation date, so an unchanged figure is an unchanged file.
_NO_DATE = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


@dataclass(frozen=True)
class RunStyle:
    color: str  # hex
    marker: str
    linestyle: str
    label: str  # "network k=2 d=512": the run's own names


RunKey = tuple[str, int, "int | None"]  # (network, width k, representation size)


@dataclass
class FigureStyle:
    """What every figure of one report shares: each run's style and the file formats written."""

    runs: dict[RunKey, RunStyle] = field(default_factory=dict)
    formats: tuple[str, ...] = ("png", "svg")  # png always; "pdf" on request

    @classmethod
    def for_study(cls, data: StudyData, pdf: bool = False) -> "FigureStyle":
        return cls(run_styles(data.networks, [(r["network"], r["width"], r["representation_size"]) for r in data.runs.values()]),
                   ("png", "svg", "pdf") if pdf else ("png", "svg"))

    def of(self, run: dict[str, Any]) -> RunStyle:
        key = (run["network"], run["width"], run["representation_size"])
        if key not in self.runs:  # a run the style was not built for (a figure drawn alone): add it, still distinct
            self.runs = run_styles([k[0] for k in self.runs] + [key[0]], list(self.runs) + [key])
        return self.runs[key]


def run_styles(networks: Sequence[str], keys: Iterable[RunKey]) -> dict[RunKey, RunStyle]:
    """One style per (network, k, size): colour by network and marker by (k, size) when the palette and
    the markers suffice; otherwise each key its own (colour, marker) pair, distinct up to 19 x 12 keys."""
    keys = sorted(set(keys), key=lambda k: (list(dict.fromkeys(networks)).index(k[0]) if k[0] in networks else len(networks),
                                            k[0], k[1] or 0, k[2] or 0))
    network_list = list(dict.fromkeys(k[0] for k in keys))
    shapes = sorted({(k[1] or 0, k[2] or 0) for k in keys})
    widths = sorted({k[1] or 0 for k in keys})
    styles = {}
    for index, key in enumerate(keys):
        network, width, size = key
        if len(network_list) <= len(PALETTE) and len(shapes) <= len(MARKERS):
            color, marker = PALETTE[network_list.index(network)], MARKERS[shapes.index((width or 0, size or 0))]
        else:
            color, marker = PALETTE[index % len(PALETTE)], MARKERS[(index // len(PALETTE)) % len(MARKERS)]
        label = f"{network} k={width}" + (f" d={size}" if size else "")
        styles[key] = RunStyle(color, marker, LINESTYLES[widths.index(width or 0) % len(LINESTYLES)], label)
    return styles


@dataclass
class FigureResult:
    name: str
    title: str
    path: Path
    points: int  # data points drawn; 0 = a placeholder saying what is missing
    table: Block | None = None
    note: str = ""
    checks: dict[str, Any] = field(default_factory=dict)  # title, axis labels, legends, run styles (from _save)


def _run_gid(config_hash: str) -> str:
    # The artist's gid names its run: the checks read it back, and the SVG carries it as the element's id.
    return f"run-{config_hash}"


def _drawn_runs(figure: Figure, plots: list[Any]) -> list[dict[str, Any]]:
    drawn = []
    for panel, ax in enumerate(plots):
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith("run-"):
                drawn.append({"run": gid[4:], "panel": panel, "color": to_hex(line.get_color()), "marker": line.get_marker()})
    return drawn


def _save(figure: Figure, path: Path, style: FigureStyle | None = None) -> dict[str, Any]:
    """Write the PNG (and SVG, PDF as asked); returns what it shows (title, each plot's axis labels,
    whether a legend is there and lies outside every plot, each run's colour and marker) for checking."""
    formats = style.formats if style is not None else ("png", "svg")
    # SVG text stays text (editable in a paper, and a third of the time of drawing every glyph as a path).
    with rc_context({"svg.fonttype": "none"}):
        for fmt in formats:
            target = path if fmt == "png" else path.with_suffix(f".{fmt}")
            atomic.write_bytes(target, lambda handle, fmt=fmt: figure.savefig(
                handle, format=fmt, dpi=FIGURE_DPI, metadata=_NO_DATE.get(fmt)))
    colorbars = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]
    plots = [ax for ax in figure.axes if ax not in colorbars]
    legends = list(figure.legends) + [ax.get_legend() for ax in plots if ax.get_legend() is not None]
    # Where things landed when the figure was last drawn (constrained layout placed the legend then).
    boxes = [ax.get_window_extent() for ax in plots]
    return {
        "title": figure.get_suptitle() or " / ".join(ax.get_title() for ax in plots),
        "axes": [
            {"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "legend": bool(legends) or bool(colorbars)}
            for ax in plots
        ],
        "legends_outside": all(not legend.get_window_extent().overlaps(box) for legend in legends for box in boxes),
        "runs": _drawn_runs(figure, plots),
        "legend_labels": [text.get_text() for legend in legends for text in legend.get_texts()],
        "files": {fmt: str(path if fmt == "png" else path.with_suffix(f".{fmt}")) for fmt in formats},
    }


def _outside_legend(figure: Figure, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    """One legend for the whole figure, right of its plots (never over the data), each label once."""
    if handles is None:
        handles, labels = [], []
        for ax in figure.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.append(handle)
                labels.append(label)
    unique = dict(zip(labels or [], handles))
    if unique:
        # Below the plots, in as many columns as the figure's width holds: a grid of 24 runs stays short.
        columns = max(1, min(len(unique), int(figure.get_figwidth() / 2.4)))
        figure.legend(list(unique.values()), list(unique), loc="outside lower center", ncols=columns, fontsize="small")


def _placeholder(path: Path, title: str, xlabel: str, ylabel: str, reason: str, style: FigureStyle | None = None) -> dict[str, Any]:
    figure = Figure(figsize=(6.4, 3.2), layout="constrained")
    axes = figure.subplots()
    axes.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=axes.transAxes, color="#777")
    axes.plot([], [], label="no finished results yet")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xticks([])
    axes.set_yticks([])
    _outside_legend(figure)
    figure.suptitle(title)
    return _save(figure, path, style)


def _label_panel(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """One panel's title, axis labels and grid, the same on every per-task figure (the legend is the figure's)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _panels(count: int, width: float = 4.2, height: float = 3.4, legend: bool = True) -> tuple[Figure, list[Any]]:
    # Room below for the figure's legend.
    figure = Figure(figsize=(max(width * count, 5.0), height + (0.8 if legend else 0.0)), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    return figure, list(axes)


def _run_line(ax: Any, style: RunStyle, config_hash: str, xs: Sequence[float], ys: Sequence[float], *,
              line: bool = True, label: bool = True, **kwargs: Any) -> None:
    """A run's points (and line) in its style, tagged with its run for the checks and the SVG."""
    kwargs.setdefault("linestyle", style.linestyle if line else "")
    ax.plot(xs, ys, color=style.color, marker=style.marker, gid=_run_gid(config_hash),
            label=style.label if label else None, **kwargs)


def _style(data: StudyData, style: FigureStyle | None) -> FigureStyle:
    return style if style is not None else FigureStyle.for_study(data)


def _task_panels(data: StudyData, series: dict[tuple[str, str], list[Any]]) -> tuple[Figure, list[tuple[Any, str, list[list[Any]]]]]:
    """One panel per task with results and, for each, its networks' point lists in the study's order."""
    tasks = [t for t in data.tasks if any(k[0] == t for k in series)]
    figure, axes = _panels(len(tasks))
    return figure, [(ax, t, [series[(t, n)] for n in data.networks if series.get((t, n))]) for ax, t in zip(axes, tasks)]


def figure_by_output(data: StudyData, dataset: str, probe: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 by output (largest width per network)"
    style = _style(data, style)
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
        checks = _placeholder(path, title, "output", "test top-1 (%)", f"no {probe} results on {dataset} yet", style)
        return FigureResult("by_output", title, path, 0, checks=checks)
    figure, panels = _task_panels(data, series)
    for ax, task, lines in panels:
        for pts in lines:
            config_hash = pts[0][2]
            _run_line(ax, style.of(data.runs[config_hash]), config_hash, [outputs.index(o) for o, _, _ in pts], [v for _, v, _ in pts])
        ax.set_xticks(range(len(outputs)), outputs, rotation=30, ha="right")
        _label_panel(ax, TASK_TITLES.get(task, task), "output", "test top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = [[Cell(task), Cell(network), Cell(o), Cell(percent_text(v), link=h)] for (task, network), pts in series.items() for o, v, h in pts]
    return FigureResult("by_output", title, path, points, data_table(["task", "network", "output", "test top-1 %"], rows), checks=checks)


def figure_by_width(data: StudyData, dataset: str, output: str, probe: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 at {output} by widening factor k"
    style = _style(data, style)
    series: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for run in sorted(data.natural_runs(), key=lambda r: r["width"]):
        result = data.result(run["config_hash"], dataset, output, probe)
        if result is not None:
            series.setdefault((run["task"], run["network"]), []).append((run["width"], result["test_top1_percent"], run["config_hash"]))
    points = sum(len(s) for s in series.values())
    if not points:
        checks = _placeholder(path, title, "widening factor k", "test top-1 (%)", f"no {probe} results at {output} on {dataset} yet", style)
        return FigureResult("by_width", title, path, 0, checks=checks)
    widths = sorted({w for s in series.values() for w, _, _ in s})
    figure, panels = _task_panels(data, series)
    for ax, task, lines in panels:
        for pts in lines:
            # The network's line joins its widths; each point is a run, in that run's marker.
            ax.plot([w for w, _, _ in pts], [v for _, v, _ in pts], "-", color=style.of(data.runs[pts[0][2]]).color, alpha=0.6)
            for w, v, h in pts:
                _run_line(ax, style.of(data.runs[h]), h, [w], [v], line=False)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        _label_panel(ax, TASK_TITLES.get(task, task), "widening factor k", "test top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(percent_text(v), link=h)] for (t, n), pts in series.items() for w, v, h in pts]
    return FigureResult("by_width", title, path, points, data_table(["task", "network", "k", "test top-1 %"], rows), checks=checks)


def figure_pretext_vs_downstream(data: StudyData, dataset: str, output: str, probe: str, path: Path,
                                 style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: pretext accuracy against {probe} test top-1 at {output}"
    style = _style(data, style)
    points: list[tuple[dict[str, Any], float]] = []
    for run in data.natural_runs():
        result = data.result(run["config_hash"], dataset, output, probe)
        if result is not None and run["pretext_val_accuracy_percent"] is not None:
            points.append((run, result["test_top1_percent"]))
    if not points:
        checks = _placeholder(path, title, "pretext validation accuracy (%)", "test top-1 (%)", "no finished runs with both numbers yet", style)
        return FigureResult("pretext_vs_downstream", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(run["task"] == t for run, _ in points)]
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for run, value in points:
            if run["task"] == task:
                _run_line(ax, style.of(run), run["config_hash"], [run["pretext_val_accuracy_percent"]], [value], line=False,
                          markersize=8, markeredgecolor="black", markeredgewidth=0.5, alpha=0.85)
        _label_panel(ax, TASK_TITLES.get(task, task), "pretext validation accuracy (%)", "test top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = [
        [Cell(r["task"]), Cell(r["network"]), Cell(str(r["width"])), Cell(f"{r['pretext_val_accuracy_percent']:.1f}", link=r["config_hash"]),
         Cell(percent_text(v), link=r["config_hash"])]
        for r, v in points
    ]
    return FigureResult("pretext_vs_downstream", title, path, len(points),
                        data_table(["task", "network", "k", "pretext val %", "test top-1 %"], rows), checks=checks)


def figure_linear_vs_mlp(data: StudyData, dataset: str, probe: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: linear ({probe}) against MLP probe, test top-1"
    style = _style(data, style)
    pairs = []
    for row in data.probes:
        if row["dataset"] == dataset and row["probe"] == "mlp" and row["labels"] == "all":
            linear = data.result(row["config_hash"], dataset, row["output"], probe)
            if linear is not None:
                pairs.append((row, linear["test_top1_percent"], row["test_top1_percent"]))
    if not pairs:
        checks = _placeholder(path, title, f"linear ({probe}) test top-1 (%)", "MLP test top-1 (%)",
                              f"no run has both {probe} and mlp results on {dataset} yet", style)
        return FigureResult("linear_vs_mlp", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[r["config_hash"]]["task"] == t for r, _, _ in pairs)]
    figure, axes = _panels(len(tasks), width=4.0, height=3.8)
    values = [v for _, a, b in pairs for v in (a, b)]
    low, high = min(values) - 2, max(values) + 2
    for ax, task in zip(axes, tasks):
        ax.plot([low, high], [low, high], "--", color="gray", linewidth=1, label="equal accuracy")
        for row, linear, mlp in pairs:
            run = data.runs[row["config_hash"]]
            if run["task"] == task:
                _run_line(ax, style.of(run), row["config_hash"], [linear], [mlp], line=False,
                          markersize=7, markeredgecolor="black", markeredgewidth=0.4)
        _label_panel(ax, TASK_TITLES.get(task, task), f"linear ({probe}) test top-1 (%)", "MLP test top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = [[Cell(data.run_label(r["config_hash"])), Cell(r["output"]), Cell(percent_text(a), link=r["config_hash"]),
             Cell(percent_text(b), link=r["config_hash"])] for r, a, b in pairs]
    return FigureResult("linear_vs_mlp", title, path, len(pairs), data_table(["run", "output", "linear %", "MLP %"], rows), checks=checks)


def figure_few_labels(data: StudyData, dataset: str, output: str, probe: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
    title = f"{dataset}: {probe} test top-1 at {output} against the number of labelled images"
    style = _style(data, style)
    series: dict[str, list[tuple[int, float, str]]] = {}
    for row in data.probes:
        if (row["dataset"], row["output"], row["probe"]) == (dataset, output, probe) and row["train_images"]:
            series.setdefault(row["config_hash"], []).append((row["train_images"], row["test_top1_percent"], row["labels"]))
    series = {h: sorted(s) for h, s in series.items() if len(s) >= 2 and data.runs[h]["representation_size"] is None}
    if not series:
        checks = _placeholder(path, title, "labelled training images", "test top-1 (%)", f"no run has {probe} results at two label budgets yet", style)
        return FigureResult("few_labels", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[h]["task"] == t for h in series)]
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for config_hash, pts in series.items():
            run = data.runs[config_hash]
            if run["task"] == task:
                _run_line(ax, style.of(run), config_hash, [n for n, _, _ in pts], [v for _, v, _ in pts])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        _label_panel(ax, TASK_TITLES.get(task, task), "labelled training images (log)", "test top-1 (%)")
    _outside_legend(figure)
    figure.suptitle(title)
    checks = _save(figure, path, style)
    rows = [[Cell(data.run_label(h)), Cell(tag), Cell(str(n)), Cell(percent_text(v), link=h)] for h, pts in series.items() for n, v, tag in pts]
    return FigureResult("few_labels", title, path, sum(len(s) for s in series.values()),
                        data_table(["run", "labels", "images", "test top-1 %"], rows), checks=checks)


def figure_width_by_size(data: StudyData, dataset: str, output: str, probe: str, path: Path, style: FigureStyle | None = None) -> FigureResult:
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
        checks = _placeholder(path, title, "representation size", "widening factor k", "no representation-size runs have finished yet", style)
        return FigureResult("width_by_representation", title, path, 0, checks=checks)
    figure, axes = _panels(len(combos), width=4.8, height=3.8, legend=False)
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
    checks = _save(figure, path, style)
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(str(s)), Cell(percent_text(v), link=h)]
            for (t, n), cells in combos.items() for (w, s), (v, h) in sorted(cells.items())]
    return FigureResult("width_by_representation", title, path, len(rows),
                        data_table(["task", "network", "k", "size", "test top-1 %"], rows), checks=checks)
