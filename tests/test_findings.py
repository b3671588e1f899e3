"""The paper's five findings as the report tests them (report/findings.py), on hand-made rows: each one
holding, failing (or holding in part) and not testable, with its counts, margin and the cells that
break it; and the list rendered in Markdown and HTML with those cells linked."""

from typing import Any

import pytest

from pretextlab.report.data import StudyData
from pretextlab.report.findings import (
    FAILS,
    HOLDS,
    NOT_TESTABLE,
    PARTLY,
    finding_linear_vs_mlp,
    finding_pretext_predictor,
    finding_ranking,
    finding_skip_connections,
    finding_wider,
    findings,
    findings_list,
)
from pretextlab.report.render import render_html, render_markdown

DATASET = "fm"


def study(cells: dict[tuple[str, str, int, int | None], dict[str, float]]) -> StudyData:
    """(task, network, k, representation size) -> {"output/probe": test top-1 %, "pretext": val %}."""
    runs: dict[str, dict[str, Any]] = {}
    probes: list[dict[str, Any]] = []
    for index, ((task, network, width, size), values) in enumerate(cells.items()):
        config_hash = f"{index:012d}"
        runs[config_hash] = {"config_hash": config_hash, "task": task, "network": network, "width": width,
                             "representation_size": size, "status": "finished",
                             "pretext_val_accuracy_percent": values.get("pretext")}
        for key, value in values.items():
            if key != "pretext":
                output, probe = key.split("/")
                probes.append({"config_hash": config_hash, "dataset": DATASET, "output": output, "probe": probe,
                               "labels": "all", "test_top1_percent": value, "val_top1_percent": value})
    tasks = list(dict.fromkeys(k[0] for k in cells))
    networks = list(dict.fromkeys(k[1] for k in cells))
    return StudyData(name="hand-made", runs=runs, retired={}, probes=probes, plan=[], curves=[], tasks=tasks,
                     networks=networks, datasets=[DATASET])


def labels(data: StudyData, refs) -> list[str]:
    return [data.run_label(r.config_hash) for r in refs]


P = "pre_logits/lbfgs"


def test_ranking_changes_between_tasks_counted_at_each_networks_largest_width():
    cells = {
        ("rotation", "resnet50v1", 2, None): {P: 70.0},
        ("rotation", "revnet50", 2, None): {P: 60.0},
        ("rotation", "revnet50", 1, None): {P: 80.0},  # narrower: not a main-table cell, so not compared
        ("exemplar", "resnet50v1", 2, None): {P: 50.0},
        ("exemplar", "revnet50", 2, None): {P: 55.0},
    }
    found = finding_ranking(study(cells), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.breaking) == (HOLDS, 1, 1, ())
    assert found.margin_points == pytest.approx(5.0, abs=1e-12)  # min(70-60, 55-50)
    assert "changes in 1 of 1 task pair(s) (1 of 1 network pairs swap), by 5.0 points" in found.detail

    cells[("exemplar", "revnet50", 2, None)] = {P: 45.0}  # same order in both tasks
    data = study(cells)
    found = finding_ranking(data, DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.margin_points) == (FAILS, 0, 1, None)
    assert labels(data, found.breaking) == ["rotation resnet50v1 k=2", "rotation revnet50 k=2",
                                            "exemplar resnet50v1 k=2", "exemplar revnet50 k=2"]

    cells[("exemplar", "revnet50", 2, None)] = {P: 55.0}
    cells[("jigsaw", "resnet50v1", 2, None)] = {P: 40.0}
    cells[("jigsaw", "revnet50", 2, None)] = {P: 38.0}  # agrees with rotation, swaps with exemplar
    found = finding_ranking(study(cells), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested) == (PARTLY, 2, 3)
    assert found.margin_points == pytest.approx((5.0 + 2.0) / 2, abs=1e-12)
    assert len(found.breaking) == 4  # the rotation/jigsaw pair's cells

    one_task = {k: v for k, v in cells.items() if k[0] == "rotation"}
    found = finding_ranking(study(one_task), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.tested) == (NOT_TESTABLE, 0)
    assert "needs two tasks" in found.detail and "tasks with results: Rotation" in found.detail


def test_skip_connections_fall_compared_with_vggs_fall_per_task():
    cells = {
        ("rotation", "resnet50v1", 2, None): {"block2/lbfgs": 72.0, P: 71.0},
        ("rotation", "vgg19bn", 2, None): {"block2/lbfgs": 70.0, "fc6/lbfgs": 68.0, P: 60.0},
    }
    found = finding_skip_connections(study(cells), DATASET, "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.breaking) == (HOLDS, 1, 1, ())
    assert found.margin_points == pytest.approx(10.0 - 1.0, abs=1e-12)
    assert "+1.0 with skip connections, +10.0 with VGG" in found.detail

    cells[("rotation", "resnet50v1", 2, None)] = {"block2/lbfgs": 83.0, P: 71.0}  # falls 12, VGG 10
    data = study(cells)
    found = finding_skip_connections(data, DATASET, "lbfgs")
    assert (found.verdict, found.holds, found.tested) == (FAILS, 0, 1)
    assert found.margin_points == pytest.approx(-2.0, abs=1e-12)
    assert [r.config_hash for r in found.breaking] == ["000000000000"]
    assert "block2 is 12.0 above pre_logits (VGG: 10.0)" in found.breaking[0].text

    no_vgg = {k: v for k, v in cells.items() if k[1] != "vgg19bn"}
    found = finding_skip_connections(study(no_vgg), DATASET, "lbfgs")
    assert found.verdict == NOT_TESTABLE and "missing: VGG19-BN" in found.detail
    # VGG probed at pre_logits only: no fall to measure, so still not testable.
    cells[("rotation", "vgg19bn", 2, None)] = {P: 60.0}
    found = finding_skip_connections(study(cells), DATASET, "lbfgs")
    assert found.verdict == NOT_TESTABLE and "missing: VGG19-BN" in found.detail
    # VGG and a skip network, but in different tasks: not comparable.
    apart = {("rotation", "resnet50v1", 2, None): {"block2/lbfgs": 72.0, P: 71.0},
             ("exemplar", "vgg19bn", 2, None): {"block2/lbfgs": 70.0, P: 60.0}}
    found = finding_skip_connections(study(apart), DATASET, "lbfgs")
    assert found.verdict == NOT_TESTABLE and "missing: both in the same task" in found.detail


def test_wider_and_larger_representations_must_rise_at_every_step():
    cells = {
        ("rotation", "resnet50v1", 1, None): {P: 60.0},
        ("rotation", "resnet50v1", 2, None): {P: 65.0},
        ("rotation", "resnet50v1", 4, None): {P: 70.0},
        ("rotation", "revnet50", 1, None): {P: 60.0},
        ("rotation", "revnet50", 2, None): {P: 58.0},
        ("rotation", "revnet50", 1, 64): {P: 50.0},
        ("rotation", "revnet50", 1, 512): {P: 55.0},
    }
    data = study(cells)
    found = finding_wider(data, DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested) == (PARTLY, 2, 3)
    assert found.margin_points == pytest.approx((10.0 - 2.0 + 5.0) / 3, abs=1e-12)
    assert "wider is better in 1 of 2 task x network pairs, by +4.0 points on average" in found.detail
    assert "larger representations are better in 1 of 1 task x network x k triples, by +5.0 points" in found.detail
    assert labels(data, found.breaking) == ["rotation revnet50 k=1", "rotation revnet50 k=2"]

    # Widest above narrowest is not enough: every step up must gain.
    bumpy = {("exemplar", "resnet50v1", 1, None): {P: 60.0}, ("exemplar", "resnet50v1", 2, None): {P: 70.0},
             ("exemplar", "resnet50v1", 4, None): {P: 65.0}}
    found = finding_wider(study(bumpy), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.margin_points, len(found.breaking)) == (FAILS, pytest.approx(5.0, abs=1e-12), 3)
    assert "larger representations are better: not testable (no task x network x k has two representation sizes finished)" in found.detail

    single = {("rotation", "resnet50v1", 2, None): {P: 60.0}, ("rotation", "revnet50", 1, 64): {P: 50.0}}
    found = finding_wider(study(single), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.tested, found.margin_points) == (NOT_TESTABLE, 0, None)
    assert "wider is better: not testable (no task x network has two widths finished)" in found.detail


def test_linear_and_mlp_probes_rank_runs_alike_by_kendalls_tau():
    def cells(mlp: tuple[float, float, float], with_mlp: int = 3):
        nets = ("resnet50v1", "revnet50", "vgg19bn")
        return {("rotation", n, 2, None): {P: lin, **({"pre_logits/mlp": m} if i < with_mlp else {})}
                for i, (n, lin, m) in enumerate(zip(nets, (60.0, 65.0, 70.0), mlp))}

    found = finding_linear_vs_mlp(study(cells((62.0, 66.0, 75.0))), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.margin_points, found.breaking) == (HOLDS, 3, 3, None, ())
    assert "order 3 of 3 pairs of runs alike (Kendall's tau 1.00)" in found.detail

    data = study(cells((62.0, 61.0, 75.0)))  # the first two swap under the MLP
    found = finding_linear_vs_mlp(data, DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested) == (PARTLY, 2, 3)
    assert found.margin_points == pytest.approx(5.0, abs=1e-12)
    assert "(Kendall's tau 0.33)" in found.detail
    assert labels(data, found.breaking) == ["rotation resnet50v1 k=2", "rotation revnet50 k=2"]
    assert found.breaking[1].text.endswith("linear 65.0, MLP 61.0")

    found = finding_linear_vs_mlp(study(cells((75.0, 66.0, 62.0))), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds) == (FAILS, 0) and "(Kendall's tau -1.00)" in found.detail

    found = finding_linear_vs_mlp(study(cells((62.0, 66.0, 75.0), with_mlp=1)), DATASET, "pre_logits", "lbfgs")
    assert found.verdict == NOT_TESTABLE and "(finished: 1)" in found.detail


def test_pretext_accuracy_compared_only_within_a_task():
    cells = {
        ("rotation", "resnet50v1", 2, None): {"pretext": 50.0, P: 70.0},
        ("rotation", "revnet50", 2, None): {"pretext": 60.0, P: 65.0},  # better pretext, worse downstream
    }
    found = finding_pretext_predictor(study(cells), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.breaking) == (HOLDS, 1, 1, ())
    assert found.margin_points == pytest.approx(5.0, abs=1e-12)
    assert ("in 1 of 1 pairs of runs of the same task, in 1 of 1 task(s), by 5.0 points on average; the widest: "
            "rotation revnet50 k=2 (pretext 60.0, downstream 65.0) against rotation resnet50v1 k=2") in found.detail

    cells[("rotation", "revnet50", 2, None)] = {"pretext": 60.0, P: 75.0}
    data = study(cells)
    found = finding_pretext_predictor(data, DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.holds, found.tested, found.margin_points) == (FAILS, 0, 1, None)
    assert [r.text for r in found.breaking] == ["rotation resnet50v1 k=2: pretext 50.0, downstream 70.0",
                                                 "rotation revnet50 k=2: pretext 60.0, downstream 75.0"]

    # Pretext accuracies of two tasks are not comparable: one run per task is nothing to test.
    apart = {("rotation", "resnet50v1", 2, None): {"pretext": 90.0, P: 50.0},
             ("exemplar", "resnet50v1", 2, None): {"pretext": 40.0, P: 70.0}}
    found = finding_pretext_predictor(study(apart), DATASET, "pre_logits", "lbfgs")
    assert (found.verdict, found.tested) == (NOT_TESTABLE, 0)


def test_findings_render_in_markdown_and_html_with_the_breaking_cells_linked():
    cells = {
        ("rotation", "resnet50v1", 1, None): {P: 60.0, "pre_logits/mlp": 61.0, "pretext": 50.0},
        ("rotation", "resnet50v1", 2, None): {P: 58.0, "pre_logits/mlp": 63.0, "pretext": 55.0},
    }
    found = findings(study(cells), DATASET)
    assert [f.key for f in found] == ["ranking", "skip_connections", "wider", "linear_vs_mlp", "pretext_predictor"]
    assert [f.verdict for f in found] == [NOT_TESTABLE, NOT_TESTABLE, FAILS, FAILS, HOLDS]
    block = findings_list(found, max_refs=1)
    markdown = render_markdown([block])
    assert markdown.count("\n- ") + markdown.startswith("- ") == 5
    assert ("- **Wider networks and larger representations are better**: does not hold — wider is better in 0 of 1 "
            "task x network pairs, by -2.0 points on average (largest minus smallest k)") in markdown
    assert "Cells that break it: [rotation resnet50v1 k=1: 60.0](#run-000000000000); and 1 more." in markdown
    assert "- **The ranking of architectures changes from task to task**: not testable — needs two tasks" in markdown
    page = render_html([block], "t")
    assert page.count("<li>") == 5
    assert '<li><b>Wider networks and larger representations are better</b>: does not hold' in page
    assert '<a href="#run-000000000000">rotation resnet50v1 k=1: 60.0</a>' in page
