"""Builds a study's report (report.md, report.html, each figure as PNG and SVG, PDF on request) from its results store alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pretextlab import atomic
from pretextlab.errors import PretextlabError
from pretextlab.report.curves import figure_pretext_training, figure_sgd_convergence
from pretextlab.report.data import StudyData, backbone_results, slug
from pretextlab.report.document import MISSING, Block, anchor
from pretextlab.report.figures import (
    FigureResult,
    FigureStyle,
    figure_by_output,
    figure_by_width,
    figure_few_labels,
    figure_linear_vs_mlp,
    figure_pretext_vs_downstream,
    figure_width_by_size,
)
from pretextlab.report.findings import findings, findings_list
from pretextlab.report.render import markdown_blocks, render_html, render_markdown
from pretextlab.report.tables import backbones_table, main_table, runs_table
from pretextlab.study.store import ResultsStore


@dataclass
class Report:
    markdown: Path
    html: Path
    figures: dict[str, Path]  # figure file stem -> PNG (the SVG, and the PDF when asked, lie beside it)
    figure_checks: dict[str, dict[str, Any]]  # figure file stem -> its title, axis labels, legends and run styles
    empty_figures: list[str]  # stems drawn as placeholders (nothing finished for them yet)
    missing_cells: int  # main-table cells without a result


def build_report(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    main_output: str = "pre_logits",
    main_probe: str = "lbfgs",
    pdf: bool = False,
    backbones: Sequence[str | os.PathLike] = (),
) -> Report:
    """Write report.md, report.html and the figures (PNG and SVG; PDF too with ``pdf``) for whatever the store holds,
    and a table of the `evaluate --backbone` results in each of ``backbones`` (their --out directories)."""
    store_path = Path(store_path)
    backbone_records = backbone_results(backbones)  # a wrong directory fails before anything is written
    if not store_path.exists():
        raise PretextlabError(f"no results store at {store_path}: run `pretextlab study FILE` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Read-only: building a report never changes the store, even one of an older format (store_format.StoreFile).
    with ResultsStore(store_path, read_only=True) as store:
        data = StudyData.load(store)
    if not data.runs:
        raise PretextlabError(f"{store_path} holds no runs: start the study with `pretextlab study FILE`")
    # One style per run for the whole report: the same run looks the same in every panel of every figure.
    style = FigureStyle.for_study(data, pdf=pdf)

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
        vectors = [(fmt.upper(), Path(file).name) for fmt, file in result.checks.get("files", {}).items() if fmt != "png"]
        if vectors:
            blocks.append(Block("files", text="Also as " + ", ".join(f"[{f}]({n})" for f, n in vectors) + "."))
        if not result.points:
            blocks.append(Block("paragraph", text=f"{MISSING} Missing: nothing has finished for this figure yet."))
        if result.note:
            blocks.append(Block("paragraph", text=result.note))
        if result.table is not None:
            blocks.append(result.table)

    for dataset in data.datasets:
        dataset_slug = slug(dataset)
        blocks.append(Block("heading", text=f"Downstream dataset: {dataset}", level=2))
        table = main_table(data, dataset, main_output, main_probe)
        missing_cells += sum(1 for row in table.rows for c in row[2:] if c.missing)
        blocks.append(Block("heading", text="Main table", level=3))
        blocks.append(Block("paragraph", text=(
            f"{main_probe} probe at {main_output}, all labels, at each network's largest width k. "
            "Bold: best network for the task (column); underlined: best task for the network (row)."
        )))
        blocks.append(Block("table", table=table))
        blocks.append(Block("heading", text="Findings", level=3))
        blocks.append(Block("paragraph", text=(
            "The paper's five findings (docs/protocol.md, Findings), each tested on this study's cells: "
            f"{main_probe} test top-1 at {main_output} unless said, in points. \"Holds in part\" means some comparisons "
            "agree and some do not; \"not testable\" names the cells the grid lacks."
        )))
        blocks.append(findings_list(findings(data, dataset, main_output, main_probe)))
        sections: list[tuple[str, str, Callable[[Path], FigureResult]]] = [
            ("by_output", "Accuracy by output", lambda p: figure_by_output(data, dataset, main_probe, p, style)),
            ("by_width", "Accuracy by widening factor", lambda p: figure_by_width(data, dataset, main_output, main_probe, p, style)),
            ("pretext_vs_downstream", "Pretext accuracy against downstream accuracy",
             lambda p: figure_pretext_vs_downstream(data, dataset, main_output, main_probe, p, style)),
            ("linear_vs_mlp", "Linear against MLP probe", lambda p: figure_linear_vs_mlp(data, dataset, main_probe, p, style)),
            ("few_labels", "Few labels", lambda p: figure_few_labels(data, dataset, main_output, main_probe, p, style)),
            ("width_by_representation", "Widening factor x representation size",
             lambda p: figure_width_by_size(data, dataset, main_output, main_probe, p, style)),
            ("sgd_convergence", "SGD probe convergence", lambda p: figure_sgd_convergence(data, dataset, p, style)),
        ]
        for stem, heading, draw in sections:
            add_figure(draw(out_dir / f"{stem}_{dataset_slug}.png"), heading)

    if backbone_records:
        blocks += _backbone_blocks(backbone_records)
    blocks.append(Block("heading", text="Pretext training", level=2))
    add_figure(figure_pretext_training(data, out_dir / "pretext_training.png", style), "Pretext training curves")

    blocks.append(Block("heading", text="Runs", level=2))
    blocks.append(Block("table", table=runs_table(data)))
    for config_hash, run in data.runs.items():
        children = [
            Block("paragraph", text=f"status {run['status']}; run directory `{_shown_path(run['run_dir'], store_path.parent)}`"
                  + (f"; error: {run['error'].splitlines()[0]}" if run.get("error") else "")),
            Block("code", text=json.dumps(run["config"], indent=2, sort_keys=True)),
        ]
        blocks.append(Block("details", text=f"{config_hash}: {data.run_label(config_hash)} ({run['status']})", children=children,
                            id=anchor(config_hash)))
    if data.retired:
        blocks.append(Block("paragraph", text=(
            f"{len(data.retired)} earlier cell(s) the study file no longer names are kept in the store but left out above: "
            + ", ".join(f"{h} ({r['task']} {r['network']} k={r['width']}, {r['status']})" for h, r in data.retired.items())
        )))

    markdown_path = atomic.write_text(out_dir / "report.md", render_markdown(markdown_blocks(blocks)))
    html_path = atomic.write_text(out_dir / "report.html", render_html(blocks, f"Study {data.name}"))
    return Report(markdown_path, html_path, figures, checks, empty, missing_cells)


def _backbone_blocks(records: list[dict[str, Any]]) -> list[Block]:
    return [
        Block("heading", text="Backbones", level=2),
        Block("paragraph", text=(
            "torchvision and timm networks probed with the study's probes, pooling and recipe (`pretextlab evaluate "
            "--backbone`); top-1 (%) on each dataset's test split, val on its held-out split. Each result's file "
            "records the backbone's identity: its weights file's SHA-256, or random init and its seed.")),
        Block("table", table=backbones_table(records)),
    ]


def build_backbone_report(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Report:
    """report.md and report.html holding only the `evaluate --backbone` results of ``dirs`` (no study)."""
    records = backbone_results(dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = "Backbones: " + ", ".join(dict.fromkeys(r["backbone"] for r in records))
    blocks = [Block("heading", text=title, level=1), *_backbone_blocks(records)[1:]]
    markdown_path = atomic.write_text(out_dir / "report.md", render_markdown(markdown_blocks(blocks)))
    html_path = atomic.write_text(out_dir / "report.html", render_html(blocks, title))
    return Report(markdown_path, html_path, {}, {}, [], 0)


def _shown_path(path: str, study_dir: Path) -> str:
    """A run directory relative to the study directory when it lies inside it (reports travel)."""
    try:
        return os.path.relpath(path, study_dir) if Path(path).resolve().is_relative_to(study_dir.resolve()) else path
    except ValueError:
        return path
