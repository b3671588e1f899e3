"""The report, from a results store alone: the main table's bold/underline/missing cells and links,
every figure drawn with a title, axis labels and a legend, and placeholders where nothing finished.
Its figures as their readers tell runs apart (issue 20): one colour and marker per (network, k,
representation size) in every panel of every figure, never two runs alike, each figure's legend
outside its plots, titles and labels from the runs' own names, SVG (and PDF on request) beside each
PNG; checked on the figure data the report records (matplotlib's own artists, read back after
drawing). Both on one report of a hand-made store, built once for the module (building it is most
of this file's time). The page in a browser: tests/test_report_browser.py."""

import re
from collections import defaultdict

import pytest

from pretextlab.demo import DemoConfig, demo_markdown, demo_run_name, demo_train_config
from pretextlab.report import build_report
from pretextlab.report.curves import figure_pretext_training
from pretextlab.report.data import StudyData
from pretextlab.report.figures import MARKERS, PALETTE, FigureStyle, run_styles
from pretextlab.study.store import ResultsStore

# (task, network, width, representation size) -> test top-1 at pre_logits; None = not finished.
GRID = {
    ("rotation", "resnet50v1", 1, None): 0.61,
    ("rotation", "resnet50v1", 2, None): 0.70,
    ("rotation", "revnet50(-)", 1, None): 0.66,
    ("rotation", "revnet50(-)", 2, None): 0.75,
    ("exemplar", "resnet50v1", 1, None): 0.52,
    ("exemplar", "resnet50v1", 2, None): 0.60,
    ("exemplar", "revnet50(-)", 1, None): 0.50,
    ("exemplar", "revnet50(-)", 2, None): None,
    ("rotation", "resnet50v1", 1, 64): 0.55,
    ("rotation", "resnet50v1", 1, 256): 0.59,
    ("rotation", "resnet50v1", 2, 64): 0.57,
    ("rotation", "resnet50v1", 2, 256): 0.66,
}


def _fill(path):
    hashes = {}
    with ResultsStore(path) as store:
        store.set_meta("study_name", "synthetic")
        for index, (key, accuracy) in enumerate(GRID.items()):
            task, network, width, size = key
            config_hash = hashes[key] = f"{index:012d}"
            plan = [("fm", o, "lbfgs", "all") for o in ("block3", "block4", "pre_logits")]
            store.register_run(config_hash, task=task, network=network, width=width, representation_size=size,
                               config={"task": task, "width": width}, run_dir=f"/runs/{config_hash}", plan=plan)
            if accuracy is None:
                continue
            attempt = store.claim(config_hash, "test:1")
            store.record_training(config_hash, {"val_pretext_accuracy": 40 + 10 * width + (5 if task == "rotation" else 0), "steps": 10}, 3.0)
            store.add_curve_points(config_hash, [
                {"step": 5, "epoch": 0.5, "pretext_accuracy": 30.0 + width},
                {"step": 10, "epoch": 1.0, "pretext_accuracy": 35.0 + width},
                {"step": 10, "epoch": 1.0, "val_pretext_accuracy": 33.0 + width},
            ])
            for output, drop in (("block3", 0.08), ("block4", 0.03), ("pre_logits", 0.0)):
                store.add_probe_result(config_hash, "fm", {"output": output, "probe": "lbfgs", "labels": "all",
                                                           "val_top1": accuracy - drop + 0.01, "test_top1": accuracy - drop,
                                                           "train_images": 1000, "chosen": {"l2": 0.01}})
            if size is None:
                store.add_probe_result(config_hash, "fm", {"output": "pre_logits", "probe": "mlp", "labels": "all",
                                                           "val_top1": accuracy + 0.03, "test_top1": accuracy + 0.02, "train_images": 1000})
                for per_class, drop in ((5, 0.2), (20, 0.1)):
                    store.add_probe_result(config_hash, "fm", {"output": "pre_logits", "probe": "lbfgs", "labels": f"{per_class}pc",
                                                               "val_top1": accuracy - drop, "test_top1": accuracy - drop,
                                                               "train_images": 10 * per_class})
                if width == 2:
                    curve = [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "val_top1": accuracy - 0.2 / e} for e in range(1, 6)]
                    store.add_probe_result(config_hash, "fm", {"output": "pre_logits", "probe": "sgd", "labels": "all",
                                                               "val_top1": curve[-1]["val_top1"], "test_top1": accuracy - 0.05,
                                                               "train_images": 1000, "curve": curve})
            store.end_attempt(config_hash, attempt, "finished")
        # A wider run from an earlier version of the study file, no longer in its grid.
        store.register_run("old000000001", task="rotation", network="resnet50v1", width=4, representation_size=None,
                           config={}, run_dir="/runs/old", plan=[("fm", "pre_logits", "lbfgs", "all")])
        store.add_probe_result("old000000001", "fm", {"output": "pre_logits", "probe": "lbfgs", "labels": "all",
                                                      "val_top1": 0.99, "test_top1": 0.99})
        store.retire(hashes.values())
    return hashes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, run hashes, report) of the hand-made store: read by every test below, changed by none."""
    root = tmp_path_factory.mktemp("report")
    hashes = _fill(root / "results.sqlite")
    return root, hashes, build_report(root / "results.sqlite", root / "report")


def test_report_marks_best_cells_links_every_number_and_draws_every_figure(built):
    _, hashes, report = built
    markdown = report.markdown.read_text()
    h = lambda *key: hashes[key]  # noqa: E731

    # Main table at the largest width (k=2): best per column (task) bold, best per row (network) underlined.
    assert f"| resnet50v1 | 2 | <ins>[70.0](#run-{h('rotation', 'resnet50v1', 2, None)})</ins> | **[60.0](#run-{h('exemplar', 'resnet50v1', 2, None)})** |" in markdown
    assert f"| revnet50(-) | 2 | <ins>**[75.0](#run-{h('rotation', 'revnet50(-)', 2, None)})**</ins> | [— (pending)](#run-{h('exemplar', 'revnet50(-)', 2, None)}) |" in markdown
    assert report.missing_cells == 1
    # The retired k=4 run is listed, but neither its width nor its 99% enter the tables.
    assert "99.0" not in markdown and "old000000001 (rotation resnet50v1 k=4, pending)" in markdown
    # Rotation is the first column, as in the paper, whatever order the store holds.
    assert "| network | k | Rotation | Exemplar |" in markdown

    # The findings section, after each dataset's main table (its rules: tests/test_findings.py).
    assert markdown.index("### Main table") < markdown.index("### Findings") < markdown.index("### Accuracy by output")
    assert ("- **Wider networks and larger representations are better**: holds — wider is better in 3 of 3 task x network "
            "pairs, by +8.7 points on average (largest minus smallest k)") in markdown
    assert "- **With skip connections quality does not fall off toward pre-logits, unlike VGG**: not testable" in markdown

    # Every link points at a run anchor that exists; every finished run is linked from some number.
    targets = set(re.findall(r"\(#(run-[0-9a-z]+)\)", markdown))
    anchors = set(re.findall(r'<a id="(run-[0-9a-z]+)"></a>', markdown))
    assert targets <= anchors and len(anchors) == len(GRID)
    assert {f"run-{v}" for k, v in hashes.items() if GRID[k] is not None} <= targets

    # Every figure has data here, a title, axis labels on every plot and a legend (or a colour bar).
    assert report.empty_figures == []
    assert len(report.figures) == 8
    for stem, path_png in report.figures.items():
        assert path_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path_png.stat().st_size > 10_000, stem
        assert f"]({stem}.png)" in markdown
        checks = report.figure_checks[stem]
        assert checks["title"], stem
        assert checks["axes"] and all(a["xlabel"] and a["ylabel"] and a["legend"] for a in checks["axes"]), (stem, checks)
    # One panel per task where panels are per task; the heat map has one panel (rotation, resnet50v1).
    assert len(report.figure_checks["by_width_fm"]["axes"]) == 2
    assert len(report.figure_checks["width_by_representation_fm"]["axes"]) == 1
    assert "| rotation | resnet50v1 | 2 | 256 | [66.0]" in markdown  # heat-map numbers, linked

    page = report.html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<img ") == 8
    assert page.count("<li><b>") == 5 and "<b>Pretext accuracy is a weak predictor of downstream accuracy</b>: holds in part" in page
    assert f'<b><a href="#run-{h("rotation", "revnet50(-)", 2, None)}">75.0</a></b>' in page
    assert f'<u><a href="#run-{h("rotation", "resnet50v1", 2, None)}">70.0</a></u>' in page
    assert '<td class="num missing">' in page and f'<details id="run-{h("exemplar", "revnet50(-)", 2, None)}">' in page


def test_report_of_a_study_that_has_not_finished_anything(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        store.register_run("000000000001", task="jigsaw", network="vgg19bn", width=8, representation_size=None,
                           config={}, run_dir="/runs/1", plan=[("imagenet", "pre_logits", "lbfgs", "all")])
    report = build_report(path, tmp_path / "report")
    markdown = report.markdown.read_text()
    assert "0 of 1 cells finished, 0 of 1 planned probe results" in markdown
    assert "| vgg19bn | 8 | [— (pending)](#run-000000000001) |" in markdown
    assert sorted(report.empty_figures) == sorted(report.figures) and len(report.figures) == 8
    assert all(c["title"] and c["axes"][0]["xlabel"] and c["axes"][0]["legend"] for c in report.figure_checks.values())
    assert markdown.count("Missing: nothing has finished for this figure yet.") == 8


def test_one_unit_whichever_names_the_records_use_and_chosen_printed_plainly(tmp_path):
    """Percent everywhere: a probe record with the unit-suffixed fields (percent) and one with the
    older fraction fields give the same numbers in the tables, figures' data and CSV."""
    import csv
    import io

    from pretextlab.report import format_chosen

    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        for config_hash, network, record in (
            ("000000000001", "resnet50v1", {"val_top1": 0.7125, "test_top1": 0.705}),
            ("000000000002", "revnet50", {"val_top1_percent": 71.25, "test_top1_percent": 70.5}),
        ):
            store.register_run(config_hash, task="rotation", network=network, width=1, representation_size=None,
                               config={}, run_dir=f"/runs/{config_hash}", plan=[("fm", "pre_logits", "lbfgs", "all")])
            attempt = store.claim(config_hash, "test:1")
            store.record_training(config_hash, {"val_pretext_accuracy_percent": 88.5, "steps": 3}, 1.0)
            store.add_curve_points(config_hash, [{"step": 3, "epoch": 1.0, "val_pretext_accuracy_percent": 88.5,
                                                  "pretext_accuracy_percent": 90.0}])
            store.add_probe_result(config_hash, "fm", {"output": "pre_logits", "probe": "lbfgs", "labels": "all",
                                                       "chosen": {"l2": 0.001}, **record})
            store.end_attempt(config_hash, attempt, "finished")
        rows = list(csv.DictReader(io.StringIO(store.probes_csv())))
    assert [(float(r["val_top1_percent"]), float(r["test_top1_percent"])) for r in rows] == [(71.25, 70.5)] * 2
    assert {float(r["pretext_val_accuracy_percent"]) for r in rows} == {88.5}
    markdown = build_report(path, tmp_path / "report").markdown.read_text()
    assert "| resnet50v1 | 1 | <ins>**[70.5](#run-000000000001)**</ins> |" in markdown  # a tie: both bold
    assert "| revnet50 | 1 | <ins>**[70.5](#run-000000000002)**</ins> |" in markdown
    assert "| rotation resnet50v1 k=1 | 1.00 | [88.5](#run-000000000001) |" in markdown  # the unit-suffixed curve names
    assert format_chosen({"l2": 0.001}) == "L2=1e-03"
    assert format_chosen({"epoch": 70, "lr": 0.2, "best_val_top1": 0.8125}) == "epoch=70 lr=0.2 best_val_top1=81.25%"
    assert format_chosen({"best_val_top1_percent": 81.25}) == "best_val_top1=81.25%"
    assert format_chosen(None) == "—"


# ---------------------------------------------------------------- figures: run styles, legends, files


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
