"""The report's figures as their readers tell runs apart (issue 20): one colour and marker per
(network, k, representation size) in every panel of every figure, never two runs alike, each figure's
legend outside its plots, titles and labels from the runs' own names, SVG (and PDF on request) beside
each PNG. Checked on the figure data the report records (matplotlib's own artists, read back after
drawing), on a report built from the hand-made store of test_report.py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from test_report import _fill

from pretextlab.demo import DemoConfig, demo_markdown, demo_run_name, demo_train_config
from pretextlab.report import build_report
from pretextlab.report.curves import figure_pretext_training
from pretextlab.report.data import StudyData
from pretextlab.report.figures import MARKERS, PALETTE, FigureStyle, run_styles
from pretextlab.study.store import ResultsStore


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    hashes = _fill(root / "results.sqlite")
    return root, hashes, build_report(root / "results.sqlite", root / "report")


def test_every_run_has_one_style_in_every_panel_and_no_two_runs_share_one(built):
    root, hashes, report = built
    key_of = {h: (k[1], k[2], k[3]) for k, h in hashes.items()}  # hash -> (network, k, size)
    styles_of_run = defaultdict(set)
    keys_of_style = defaultdict(set)
    drawn_figures = 0
    for stem, checks in report.figure_checks.items():
        runs_in_panel = defaultdict(lambda: defaultdict(set))
        for drawn in checks["runs"]:
            style = (drawn["color"], drawn["marker"])
            styles_of_run[drawn["run"]].add(style)
            keys_of_style[style].add(key_of[drawn["run"]])
            runs_in_panel[drawn["panel"]][style].add(drawn["run"])
        for panel, by_style in runs_in_panel.items():
            assert all(len(runs) == 1 for runs in by_style.values()), (stem, panel, dict(by_style))
        drawn_figures += bool(checks["runs"])
    # Every figure but the heat map (whose colours are values, its cells numbered) draws runs.
    assert drawn_figures == len(report.figures) - 1
    # All finished runs appear (the representation-size runs in the pretext-training figure).
    assert set(styles_of_run) == {h for k, h in hashes.items() if k in _finished(hashes)}
    assert all(len(styles) == 1 for styles in styles_of_run.values()), dict(styles_of_run)
    assert all(len(keys) == 1 for keys in keys_of_style.values()), dict(keys_of_style)
    # Colour by network, marker by (k, size): the eight (network, k, size) of this grid, 2 colours x 6 markers.
    assert len(keys_of_style) == 8 and len({c for c, _ in keys_of_style}) == 2


def _finished(hashes):
    from test_report import GRID

    return {k for k in hashes if GRID[k] is not None}


def test_legends_lie_outside_the_plots_and_name_runs_by_their_own_names(built):
    _, _, report = built
    for stem, checks in report.figure_checks.items():
        assert checks["legends_outside"], stem
    labels = report.figure_checks["pretext_training"]["legend_labels"]
    assert "revnet50(-) k=2" in labels and "resnet50v1 k=2 d=256" in labels and "resnet50v1 k=1" in labels
    # The heat map's colour bar is its legend: no sentence in the report needs to say so.
    assert "colour bar is the heat map" not in report.markdown.read_text()


def test_each_figure_is_also_an_svg_beside_its_png_and_a_pdf_on_request(built, tmp_path):
    root, hashes, report = built
    markdown = report.markdown.read_text()
    for stem, png in report.figures.items():
        svg = png.with_suffix(".svg")
        text = svg.read_text()
        assert text.startswith("<?xml") and "<svg" in text and "Date" not in text, stem
        assert f"[SVG]({stem}.svg)" in markdown
        assert not png.with_suffix(".pdf").exists()
    # The SVG names each run's artists by the run (the same anchor as the report's run list).
    assert f'id="run-{hashes[("rotation", "revnet50(-)", 2, None)]}"' in report.figures["pretext_training"].with_suffix(".svg").read_text()

    with ResultsStore(root / "results.sqlite", create=False) as store:
        data = StudyData.load(store)
    result = figure_pretext_training(data, tmp_path / "curves.png", FigureStyle.for_study(data, pdf=True))
    assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-" and (tmp_path / "curves.svg").exists()
    assert result.checks["files"] == {f: str(tmp_path / f"curves.{f}") for f in ("png", "svg", "pdf")}


def test_styles_stay_distinct_on_the_papers_grid_and_beyond_the_palette():
    networks = ["resnet50v1", "resnet50v2", "resnet50v2(-)", "revnet50", "revnet50(-)", "vgg19bn"]
    # Widths as in the paper's Table 2, representation sizes at two of them (its Fig. 4).
    grid = [(n, k, None) for n in networks for k in (1, 2, 4, 8, 12, 16)]
    grid += [(n, k, s) for n in networks for k in (4, 16) for s in (64, 512)]
    styles = run_styles(networks, grid)
    pairs = {(s.color, s.marker) for s in styles.values()}
    assert len(pairs) == len(grid)
    assert {styles[("revnet50(-)", k, None)].color for k in (1, 2, 4)} == {PALETTE[4]}  # colour = network
    # More networks than colours: each key still gets a pair of its own.
    many = [(f"net{i}", k, None) for i in range(len(PALETTE) + 5) for k in (1, 2)]
    many += [("net0", k, s) for k in (1, 2, 4, 8) for s in (64, 512, 2048)]
    styles = run_styles([n for n, _, _ in many], many)
    assert len({(s.color, s.marker) for s in styles.values()}) == len(many) <= len(PALETTE) * len(MARKERS)


def test_demo_names_its_network_as_the_run_does_and_its_markdown_travels(tmp_path):
    config = demo_train_config(DemoConfig(out=str(tmp_path), device="cpu"))
    assert config.network == "revnet50" and config.final_relu is False
    assert demo_run_name(config) == f"revnet50 (-) k={config.width}"
    text = demo_markdown("rotation", {"val_pretext_accuracy_percent": 91.0}, 1000, ["| a |"], 60.0, 30.0,
                         tmp_path / "demo" / "training_curve.png")
    assert text.endswith("curve: training_curve.png") and str(tmp_path) not in text
