"""The report's tables (the main networks x tasks table, the runs list) and how numbers are written in them."""

from __future__ import annotations

from typing import Any

from pretextlab.report.data import TASK_TITLES, StudyData, backbone_label
from pretextlab.report.document import MISSING, Block, Cell, Table


def percent_text(value: float | None) -> str:
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
                row.append(Cell(percent_text(result["test_top1_percent"]), link=run["config_hash"]))
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
    # Set, not read from the cells: a config hash of digits only is still a name.
    return Table(header=header, rows=rows, align=["left"] * 3 + ["right"] * 2 + ["left"] + ["right"] * 4)


def data_table(header: list[str], rows: list[list[Cell]]) -> Block:
    return Block("details", text="the numbers (each links to its run)", children=[Block("table", table=Table(header, rows))])


def backbones_table(records: list[dict[str, Any]]) -> Table:
    """Every `evaluate --backbone` result: which network and weights, where it was probed, how well."""
    rows = [
        [Cell(r["backbone"]), Cell(backbone_label(r)), Cell(r.get("dataset") or MISSING), Cell(r["output"]),
         Cell(r["probe"] + (f" ({r['sgd_preset']})" if r.get("sgd_preset") else "")),
         Cell(r.get("labels") or "all"), Cell(str(r.get("train_images", MISSING))), Cell(percent_text(r.get("val_top1_percent"))),
         Cell(percent_text(r.get("test_top1_percent"))), Cell(format_chosen(r.get("chosen")))]
        for r in records
    ]
    header = ["backbone", "weights", "dataset", "output", "probe", "labels", "train images", "val top-1 %", "test top-1 %", "chosen"]
    return Table(header=header, rows=rows, align=["left"] * 6 + ["right"] * 3 + ["left"])
