"""The report, from a results store alone: the main table's bold/underline/missing cells and links,
every figure drawn with a title, axis labels and a legend, and placeholders where nothing finished.
(Its figures' run styles: tests/test_report_figures.py; the page in a browser: tests/test_report_browser.py.)"""

import re

from pretextlab.report import build_report
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


def test_report_marks_best_cells_links_every_number_and_draws_every_figure(tmp_path):
    path = tmp_path / "results.sqlite"
    hashes = _fill(path)
    report = build_report(path, tmp_path / "report")
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
