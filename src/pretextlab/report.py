"""The study's tables and figures, rebuilt from its results store alone.

``build_report(store, out_dir)`` writes ``report.md`` and ``report.html`` (the same content) and
one PNG per figure, for whatever has finished; cells and figures without results say so. Every
number links to its run (an anchor in the report's run list, which gives the run's config hash,
status, directory and full config).

Contents, per downstream dataset:
- the main table: networks x tasks at each network's largest width (the study's Table 2); the best
  cell of each column in bold, the best of each row underlined;
- accuracy by output (block1 .. pre_logits) per network and task;
- accuracy by widening factor per network and task;
- pretext accuracy against downstream accuracy, marker size = width;
- linear (L-BFGS) against MLP probes; few-label curves; the width x representation-size heat map;
  SGD probe convergence curves;
and, for the whole study, the pretext training curves.

Accuracies are percent everywhere: in the store (``*_percent`` columns), the tables and the figures.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter, ScalarFormatter

from pretextlab import atomic
from pretextlab.errors import PretextlabError
from pretextlab.store import ResultsStore

# The paper's orders; names a study adds beyond these follow in the study file's order.
TASK_ORDER = ("rotation", "exemplar", "relative_patch", "jigsaw")
NETWORK_ORDER = ("resnet50v1", "resnet50v2", "resnet50v2(-)", "revnet50", "revnet50(-)", "vgg19bn")
OUTPUT_ORDER = ("block1", "block2", "block3", "block4", "block5", "fc6", "pre_logits")
TASK_TITLES = {"rotation": "Rotation", "exemplar": "Exemplar", "relative_patch": "Rel. Patch Loc.", "jigsaw": "Jigsaw"}
MISSING = "—"
# Keys a probe record may keep its per-epoch curve under, and the accuracy keys inside a point with
# the factor to percent (records before the unit-suffixed names held fractions under "val_top1").
CURVE_KEYS = ("curve", "history", "per_epoch")
CURVE_ACCURACY_KEYS = (("val_top1_percent", 1.0), ("val_top1", 100.0))
# Pretext accuracy metric names in metrics.jsonl (percent under both the old and the unit-suffixed names).
PRETEXT_TRAIN_NAMES = ("pretext_accuracy_percent", "pretext_accuracy")
PRETEXT_VAL_NAMES = ("val_pretext_accuracy_percent", "val_pretext_accuracy")
FIGURE_DPI = 110


# -- a small document model, rendered to Markdown and to HTML ----------------------------------


@dataclass
class Cell:
    text: str
    link: str | None = None  # a run's config hash
    bold: bool = False
    underline: bool = False
    missing: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class Block:
    kind: str  # heading, paragraph, table, image, details, anchor_list
    text: str = ""
    level: int = 2
    table: Table | None = None
    path: str = ""
    children: list["Block"] = field(default_factory=list)


def _anchor(config_hash: str) -> str:
    return f"run-{config_hash}"


def _md_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    if cell.link:
        text = f"[{text}](#{_anchor(cell.link)})"
    if cell.bold:
        text = f"**{text}**"
    if cell.underline:
        text = f"<ins>{text}</ins>"
    return text


def _html_cell(cell: Cell) -> str:
    text = html.escape(cell.text)
    if cell.link:
        text = f'<a href="#{_anchor(cell.link)}">{text}</a>'
    if cell.bold:
        text = f"<b>{text}</b>"
    if cell.underline:
        text = f"<u>{text}</u>"
    return f'<td class="missing">{text}</td>' if cell.missing else f"<td>{text}</td>"


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            out.append(f"{'#' * block.level} {block.text}\n")
        elif block.kind == "paragraph":
            out.append(block.text + "\n")
        elif block.kind == "table" and block.table is not None:
            table = block.table
            out.append("| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |")
            out.append("|" + "|".join("---" for _ in table.header) + "|")
            for row in table.rows:
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            out.append("")
        elif block.kind == "image":
            out.append(f"![{block.text}]({block.path})\n")
        elif block.kind == "details":
            out.append(f"<details><summary>{html.escape(block.text)}</summary>\n")
            out.append(render_markdown(block.children))
            out.append("</details>\n")
        elif block.kind == "anchor":
            out.append(f'<a id="{block.text}"></a>\n')
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.missing { color: #999; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.3em 0 1em; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    def body(items: Sequence[Block]) -> list[str]:
        out: list[str] = []
        for block in items:
            if block.kind == "heading":
                out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
            elif block.kind == "paragraph":
                text = html.escape(block.text)
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
                out.append(f"<p>{text}</p>")
            elif block.kind == "table" and block.table is not None:
                rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.table.header) + "</tr>"]
                rows += ["<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block.table.rows]
                out.append("<table>\n" + "\n".join(rows) + "\n</table>")
            elif block.kind == "image":
                out.append(f'<p><img src="{html.escape(block.path)}" alt="{html.escape(block.text)}"></p>')
            elif block.kind == "details":
                out.append(f"<details><summary>{html.escape(block.text)}</summary>")
                out.extend(body(block.children))
                out.append("</details>")
            elif block.kind == "anchor":
                out.append(f'<a id="{html.escape(block.text)}"></a>')
            elif block.kind == "code":
                out.append(f"<pre>{html.escape(block.text)}</pre>")
        return out

    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(body(blocks))
        + "\n</body></html>\n"
    )


# -- reading the store ---------------------------------------------------------------------------


def _ordered(names: Iterable[str], preferred: Sequence[str], study_order: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    rank = {n: i for i, n in enumerate(list(preferred) + [n for n in study_order if n not in preferred])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _percent(value: float | None) -> str:
    """A percentage as the tables show it (the store holds percent already)."""
    return MISSING if value is None else f"{value:.1f}"


def format_chosen(chosen: Any) -> str:
    """What a probe chose, as a person reads it: ``L2=1e-03``, or ``epoch=70 lr=0.2 ...`` for the SGD
    probes (their best validation epoch's accuracy in percent, whichever unit the record used)."""
    if not chosen:
        return MISSING
    if not isinstance(chosen, dict):
        return str(chosen)
    parts = []
    for key, value in chosen.items():
        if key == "l2" and isinstance(value, (int, float)):
            parts.append(f"L2={value:.0e}")
        elif key == "weight_decay" and isinstance(value, (int, float)):
            parts.append(f"weight_decay={value:.0e}")
        elif key in ("best_val_top1", "best_val_top1_percent") and isinstance(value, (int, float)):
            parts.append(f"best_val_top1={value * (100 if key == 'best_val_top1' else 1):.2f}%")
        elif isinstance(value, float):
            parts.append(f"{key}={value:g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "dataset"


def _labels_sort_key(tag: str) -> tuple[int, float]:
    if tag == "all":
        return (2, 0.0)
    number = re.match(r"[0-9.]+", tag)
    return (0 if tag.endswith("pc") else 1, float(number.group()) if number else 0.0)


@dataclass
class StudyData:
    """Everything the report reads from the store, indexed the ways the tables and figures need."""

    name: str
    runs: dict[str, dict[str, Any]]  # the cells of the study file's current grid
    retired: dict[str, dict[str, Any]]  # cells the study file no longer names (listed, not tabulated)
    probes: list[dict[str, Any]]
    plan: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    tasks: list[str]
    networks: list[str]
    datasets: list[str]

    @classmethod
    def load(cls, store: ResultsStore) -> "StudyData":
        everything = store.runs()
        runs = {r["config_hash"]: r for r in everything if r["in_study"]}
        retired = {r["config_hash"]: r for r in everything if not r["in_study"]}
        probes = [p for p in store.probes() if p["config_hash"] in runs]
        plan = [p for p in store.planned() if p["config_hash"] in runs]
        split = lambda key: [v for v in (store.get_meta(key) or "").split(",") if v]  # noqa: E731
        tasks = _ordered((r["task"] for r in runs.values()), TASK_ORDER, split("task_order"))
        networks = _ordered((r["network"] for r in runs.values()), NETWORK_ORDER, split("network_order"))
        dataset_names = [p["dataset"] for p in plan] + [p["dataset"] for p in probes]
        datasets = _ordered(dataset_names, split("dataset_order"), [])
        return cls(
            name=store.get_meta("study_name") or store.path.parent.name,
            runs=runs,
            retired=retired,
            probes=probes,
            plan=plan,
            curves=[c for c in store.curves() if c["config_hash"] in runs],
            tasks=tasks,
            networks=networks,
            datasets=datasets,
        )

    def result(self, config_hash: str, dataset: str, output: str, probe: str, labels: str = "all") -> dict[str, Any] | None:
        for row in self.probes:
            if (row["config_hash"], row["dataset"], row["output"], row["probe"], row["labels"]) == (
                config_hash, dataset, output, probe, labels
            ):
                return row
        return None

    def natural_runs(self) -> list[dict[str, Any]]:
        """Runs without a representation-size layer (the main grid)."""
        return [r for r in self.runs.values() if r["representation_size"] is None]

    def largest_width(self, network: str) -> int | None:
        widths = [r["width"] for r in self.natural_runs() if r["network"] == network]
        return max(widths) if widths else None

    def find_run(self, task: str, network: str, width: int | None, size: int | None = None) -> dict[str, Any] | None:
        for run in self.runs.values():
            if (run["task"], run["network"], run["width"], run["representation_size"]) == (task, network, width, size):
                return run
        return None

    def run_label(self, config_hash: str) -> str:
        run = self.runs[config_hash]
        size = f" d={run['representation_size']}" if run["representation_size"] else ""
        return f"{run['task']} {run['network']} k={run['width']}{size}"


# -- tables ----------------------------------------------------------------------------------------


def _missing_cell(run: dict[str, Any] | None) -> Cell:
    if run is None:
        return Cell("not in study", missing=True)
    status = {"finished": "not planned", "running": "running", "failed": "failed"}.get(run["status"], "pending")
    return Cell(f"{MISSING} ({status})", link=run["config_hash"], missing=True)


def _mark_best(rows: list[list[Cell]], values: list[list[float | None]]) -> None:
    """Bold the best of each column, underline the best of each row (ties all marked)."""
    if not values:
        return
    for j in range(len(values[0])):
        column = [v[j] for v in values if v[j] is not None]
        for i, row_values in enumerate(values):
            if column and row_values[j] is not None and row_values[j] == max(column):
                rows[i][j + 2].bold = True
    for i, row_values in enumerate(values):
        present = [v for v in row_values if v is not None]
        for j, value in enumerate(row_values):
            if present and value is not None and value == max(present):
                rows[i][j + 2].underline = True


def main_table(data: StudyData, dataset: str, output: str, probe: str) -> Table:
    """Networks x tasks at each network's largest width: the study's main table."""
    rows, values = [], []
    for network in data.networks:
        width = data.largest_width(network)
        if width is None:
            continue
        row = [Cell(network), Cell(str(width))]
        row_values: list[float | None] = []
        for task in data.tasks:
            run = data.find_run(task, network, width)
            result = data.result(run["config_hash"], dataset, output, probe) if run else None
            if result is None:
                row.append(_missing_cell(run))
                row_values.append(None)
            else:
                row.append(Cell(_percent(result["test_top1_percent"]), link=run["config_hash"]))
                row_values.append(result["test_top1_percent"])
        rows.append(row)
        values.append(row_values)
    _mark_best(rows, values)
    return Table(header=["network", "k"] + [TASK_TITLES.get(t, t) for t in data.tasks], rows=rows)


def runs_table(data: StudyData) -> Table:
    rows = []
    for config_hash, run in data.runs.items():
        finished = [p for p in data.probes if p["config_hash"] == config_hash]
        planned = [p for p in data.plan if p["config_hash"] == config_hash]
        seconds = lambda v: MISSING if v is None else f"{v / 60:.1f}"  # noqa: E731
        rows.append(
            [
                Cell(config_hash),
                Cell(run["task"]),
                Cell(run["network"]),
                Cell(str(run["width"])),
                Cell(str(run["representation_size"] or "")),
                Cell(run["status"]),
                Cell(MISSING if run["pretext_val_accuracy_percent"] is None else f"{run['pretext_val_accuracy_percent']:.1f}"),
                Cell(f"{len(finished)}/{len(planned)}"),
                Cell(seconds(run["train_seconds"])),
                Cell(seconds(run["probe_seconds"])),
            ]
        )
    header = ["run", "task", "network", "k", "size", "status", "pretext val %", "probes", "train min", "probe min"]
    return Table(header=header, rows=rows)


def _data_table(header: list[str], rows: list[list[Cell]]) -> Block:
    return Block("details", text="the numbers (each links to its run)", children=[Block("table", table=Table(header, rows))])


# -- figures ---------------------------------------------------------------------------------------


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
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("output")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(task), Cell(network), Cell(o), Cell(_percent(v), link=h)] for (task, network), pts in series.items() for o, v, h in pts]
    return FigureResult("by_output", title, path, points, _data_table(["task", "network", "output", "test top-1 %"], rows), checks=checks)


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
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("widening factor k")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(_percent(v), link=h)] for (t, n), pts in series.items() for w, v, h in pts]
    return FigureResult("by_width", title, path, points, _data_table(["task", "network", "k", "test top-1 %"], rows), checks=checks)


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
         Cell(_percent(v), link=r["config_hash"])]
        for r, v in points
    ]
    return FigureResult("pretext_vs_downstream", title, path, len(points),
                        _data_table(["task", "network", "k", "pretext val %", "test top-1 %"], rows), checks=checks)


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
    rows = [[Cell(data.run_label(r["config_hash"])), Cell(r["output"]), Cell(_percent(a), link=r["config_hash"]),
             Cell(_percent(b), link=r["config_hash"])] for r, a, b in pairs]
    return FigureResult("linear_vs_mlp", title, path, len(pairs), _data_table(["run", "output", "linear %", "MLP %"], rows), checks=checks)


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
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("labelled training images (log)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = [[Cell(data.run_label(h)), Cell(tag), Cell(str(n)), Cell(_percent(v), link=h)] for h, pts in series.items() for n, v, tag in pts]
    return FigureResult("few_labels", title, path, sum(len(s) for s in series.values()),
                        _data_table(["run", "labels", "images", "test top-1 %"], rows), checks=checks)


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
    rows = [[Cell(t), Cell(n), Cell(str(w)), Cell(str(s)), Cell(_percent(v), link=h)]
            for (t, n), cells in combos.items() for (w, s), (v, h) in sorted(cells.items())]
    return FigureResult("width_by_representation", title, path, len(rows),
                        _data_table(["task", "network", "k", "size", "test top-1 %"], rows),
                        note="The colour bar is the heat map's legend.", checks=checks)


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


def figure_sgd_convergence(data: StudyData, dataset: str, path: Path) -> FigureResult:
    title = f"{dataset}: SGD linear probe convergence (dashed: L-BFGS on the same features)"
    curves = []
    for row in data.probes:
        if row["dataset"] == dataset and row["probe"] == "sgd" and row["labels"] == "all":
            curve = _curve(row["record"])
            if curve:
                curves.append((row, curve))
    if not curves:
        checks = _placeholder(path, title, "probe training epoch", "validation top-1 (%)", f"no SGD probe results with a per-epoch curve on {dataset} yet")
        return FigureResult("sgd_convergence", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[r["config_hash"]]["task"] == t for r, _ in curves)]
    figure, axes = _panels(len(tasks), width=5.0, height=3.8)
    for ax, task in zip(axes, tasks):
        mine = [(r, c) for r, c in curves if data.runs[r["config_hash"]]["task"] == task]
        colors = _colors([f"{r['config_hash']}/{r['output']}" for r, _ in mine])
        for row, curve in mine:
            color = colors[f"{row['config_hash']}/{row['output']}"]
            run = data.runs[row["config_hash"]]
            size = f" d={run['representation_size']}" if run["representation_size"] else ""
            label = f"{run['network']} k={run['width']}{size} {row['output']}"
            ax.plot([e for e, _ in curve], [v for _, v in curve], color=color, label=label)
            lbfgs = data.result(row["config_hash"], dataset, row["output"], "lbfgs")
            if lbfgs is not None and lbfgs["val_top1_percent"] is not None:
                ax.axhline(lbfgs["val_top1_percent"], color=color, linestyle="--", linewidth=1)
        ax.set_xlabel("probe training epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(TASK_TITLES.get(task, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = []
    for row, curve in curves:
        lbfgs = data.result(row["config_hash"], dataset, row["output"], "lbfgs")
        rows.append([Cell(data.run_label(row["config_hash"])), Cell(row["output"]), Cell(f"{curve[-1][0]:g}"),
                     Cell(_percent(row["val_top1_percent"]), link=row["config_hash"]),
                     Cell(_percent(lbfgs["val_top1_percent"]) if lbfgs else MISSING, link=row["config_hash"] if lbfgs else None)])
    return FigureResult("sgd_convergence", title, path, len(curves),
                        _data_table(["run", "output", "epochs", "SGD val %", "L-BFGS val %"], rows), checks=checks)


def figure_pretext_training(data: StudyData, path: Path) -> FigureResult:
    title = "Pretext training: accuracy on the training batches (lines) and on the held-out split (dots)"
    by_run: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for point in data.curves:
        kind = "train" if point["name"] in PRETEXT_TRAIN_NAMES else "val" if point["name"] in PRETEXT_VAL_NAMES else None
        if kind is not None and point["epoch"] is not None:
            by_run.setdefault(point["config_hash"], {}).setdefault(kind, []).append((point["epoch"], point["value"]))
    if not by_run:
        checks = _placeholder(path, title, "epoch", "pretext accuracy (%)", "no pretext training curves recorded yet")
        return FigureResult("pretext_training", title, path, 0, checks=checks)
    tasks = [t for t in data.tasks if any(data.runs[h]["task"] == t for h in by_run)]
    colors = _colors(list(by_run))
    figure, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for config_hash, series in by_run.items():
            if data.runs[config_hash]["task"] != task:
                continue
            color = colors[config_hash]
            train = sorted(series.get("train", []))
            val = sorted(series.get("val", []))
            label = f"{data.runs[config_hash]['network']} k={data.runs[config_hash]['width']}"
            if data.runs[config_hash]["representation_size"]:
                label += f" d={data.runs[config_hash]['representation_size']}"
            if train:
                ax.plot([e for e, _ in train], [v for _, v in train], color=color, alpha=0.8, label=label)
            if val:
                ax.plot([e for e, _ in val], [v for _, v in val], "o", color=color, label=None if train else label)
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("epoch")
        ax.set_ylabel("pretext accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    checks = _save(figure, path)
    rows = []
    for config_hash, series in by_run.items():
        val = sorted(series.get("val", []))
        if val:
            rows.append([Cell(data.run_label(config_hash)), Cell(f"{val[-1][0]:.2f}"), Cell(f"{val[-1][1]:.1f}", link=config_hash)])
    return FigureResult("pretext_training", title, path, len(by_run),
                        _data_table(["run", "epoch", "final val pretext %"], rows), checks=checks)


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: Path
    html: Path
    figures: dict[str, Path]  # figure file stem -> PNG
    figure_checks: dict[str, dict[str, Any]]  # figure file stem -> its title, axis labels and legends
    empty_figures: list[str]  # stems drawn as placeholders (nothing finished for them yet)
    missing_cells: int  # main-table cells without a result


def build_report(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    main_output: str = "pre_logits",
    main_probe: str = "lbfgs",
) -> Report:
    """Write report.md, report.html and the figures for whatever the store holds."""
    store_path = Path(store_path)
    if not store_path.exists():
        raise PretextlabError(f"no results store at {store_path}: run `pretextlab study FILE` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ResultsStore(store_path, create=False) as store:
        data = StudyData.load(store)
    if not data.runs:
        raise PretextlabError(f"{store_path} holds no runs: start the study with `pretextlab study FILE`")

    done = sum(1 for r in data.runs.values() if r["status"] == "finished")
    blocks: list[Block] = [
        Block("heading", text=f"Study {data.name}", level=1),
        Block("paragraph", text=(
            f"{done} of {len(data.runs)} cells finished, {len(data.probes)} of {len(data.plan)} planned probe results. "
            f"Accuracies are top-1 (%) on each dataset's test split; {MISSING} marks a result that has not finished "
            "(its run's status in brackets). Every number links to its run below. Built from "
            f"`{store_path.name}` alone."
        )),
    ]
    figures: dict[str, Path] = {}
    checks: dict[str, dict[str, Any]] = {}
    empty: list[str] = []
    missing_cells = 0

    def add_figure(result: FigureResult, heading: str) -> None:
        figures[result.path.stem] = result.path
        checks[result.path.stem] = result.checks
        if not result.points:
            empty.append(result.path.stem)
        blocks.append(Block("heading", text=heading, level=3))
        blocks.append(Block("image", text=result.title, path=result.path.name))
        if not result.points:
            blocks.append(Block("paragraph", text=f"{MISSING} Missing: nothing has finished for this figure yet."))
        if result.note:
            blocks.append(Block("paragraph", text=result.note))
        if result.table is not None:
            blocks.append(result.table)

    for dataset in data.datasets:
        slug = _slug(dataset)
        blocks.append(Block("heading", text=f"Downstream dataset: {dataset}", level=2))
        table = main_table(data, dataset, main_output, main_probe)
        missing_cells += sum(1 for row in table.rows for c in row[2:] if c.missing)
        blocks.append(Block("heading", text="Main table", level=3))
        blocks.append(Block("paragraph", text=(
            f"{main_probe} probe at {main_output}, all labels, at each network's largest width k. "
            "Bold: best network for the task (column); underlined: best task for the network (row)."
        )))
        blocks.append(Block("table", table=table))
        sections: list[tuple[str, str, Callable[[Path], FigureResult]]] = [
            ("by_output", "Accuracy by output", lambda p: figure_by_output(data, dataset, main_probe, p)),
            ("by_width", "Accuracy by widening factor", lambda p: figure_by_width(data, dataset, main_output, main_probe, p)),
            ("pretext_vs_downstream", "Pretext accuracy against downstream accuracy",
             lambda p: figure_pretext_vs_downstream(data, dataset, main_output, main_probe, p)),
            ("linear_vs_mlp", "Linear against MLP probe", lambda p: figure_linear_vs_mlp(data, dataset, main_probe, p)),
            ("few_labels", "Few labels", lambda p: figure_few_labels(data, dataset, main_output, main_probe, p)),
            ("width_by_representation", "Widening factor x representation size",
             lambda p: figure_width_by_size(data, dataset, main_output, main_probe, p)),
            ("sgd_convergence", "SGD probe convergence", lambda p: figure_sgd_convergence(data, dataset, p)),
        ]
        for stem, heading, draw in sections:
            add_figure(draw(out_dir / f"{stem}_{slug}.png"), heading)

    blocks.append(Block("heading", text="Pretext training", level=2))
    add_figure(figure_pretext_training(data, out_dir / "pretext_training.png"), "Pretext training curves")

    blocks.append(Block("heading", text="Runs", level=2))
    blocks.append(Block("table", table=runs_table(data)))
    for config_hash, run in data.runs.items():
        blocks.append(Block("anchor", text=_anchor(config_hash)))
        children = [
            Block("paragraph", text=f"status {run['status']}; run directory `{_shown_path(run['run_dir'], store_path.parent)}`"
                  + (f"; error: {run['error'].splitlines()[0]}" if run.get("error") else "")),
            Block("code", text=json.dumps(run["config"], indent=2, sort_keys=True)),
        ]
        blocks.append(Block("details", text=f"{config_hash}: {data.run_label(config_hash)} ({run['status']})", children=children))
    if data.retired:
        blocks.append(Block("paragraph", text=(
            f"{len(data.retired)} earlier cell(s) the study file no longer names are kept in the store but left out above: "
            + ", ".join(f"{h} ({r['task']} {r['network']} k={r['width']}, {r['status']})" for h, r in data.retired.items())
        )))

    markdown_path = atomic.write_text(out_dir / "report.md", render_markdown(_markdown_blocks(blocks)))
    html_path = atomic.write_text(out_dir / "report.html", render_html(blocks, f"Study {data.name}"))
    return Report(markdown_path, html_path, figures, checks, empty, missing_cells)


def _shown_path(path: str, study_dir: Path) -> str:
    """A run directory relative to the study directory when it lies inside it (reports travel)."""
    try:
        return os.path.relpath(path, study_dir) if Path(path).resolve().is_relative_to(study_dir.resolve()) else path
    except ValueError:
        return path


def _markdown_blocks(blocks: list[Block]) -> list[Block]:
    """Markdown has no 'code' block kind of ours: turn them into fenced paragraphs."""
    result = []
    for block in blocks:
        if block.kind == "code":
            result.append(Block("paragraph", text=f"```json\n{block.text}\n```"))
        elif block.kind == "details":
            result.append(Block("details", text=block.text, children=_markdown_blocks(block.children)))
        else:
            result.append(block)
    return result
