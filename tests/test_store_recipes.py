"""A study's stored probe result is its planned probe's only when it came from the same probe recipe
(issue 14: nothing stale is ever reused): an edited l2_grid or sgd schedule / epochs / batch size /
learning rate re-plans that probe, the old result is kept but no longer current (not in probes(),
the CSV or the report), and changing the recipe back makes it current again. Stores of formats 1
(tests/data/store_v1.sqlite) and 2 (tests/data/store_v2.sqlite, made by the code before recipe ids)
are upgraded and keep what they can prove."""

import dataclasses
import shutil
import sqlite3
from pathlib import Path

import pytest

from pretextlab.evaluate.probe_run import NOT_IN_RECIPE, EvalConfig
from pretextlab.study import expand_cells, parse_study, register, study_status
from pretextlab.study.grid import probe_eval_config
from pretextlab.study.store import ResultsStore
from pretextlab.study.store_format import NOT_IN_PROBE_RECIPE, SCHEMA_VERSION, probe_recipe_id

DATA = Path(__file__).parent / "data"


def _study(tmp_path, l2_grid=None, sgd=None):
    evaluation = {"outputs": ["pre_logits"], "probes": ["lbfgs", "sgd"], "labels": ["all"]}
    if l2_grid is not None:
        evaluation["l2_grid"] = l2_grid
    if sgd is not None:
        evaluation["sgd"] = sgd
    data = {
        "name": "recipes",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "epochs": 0.5, "batch_size": 16},
        "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1]}],
        "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 200, "test_limit": 100}},
        "evaluations": [evaluation],
    }
    study = parse_study(data, out=tmp_path / "study")
    [cell] = expand_cells(study)
    return study, cell


def _record(study, job, test):
    """What evaluate stores for the job (its resolved probe config included), as if it had run."""
    config = probe_eval_config(study, job.dataset, job.probe, job.labels, job.l2_grid, job.sgd, (job.output,))
    return {"output": job.output, "probe": job.stored_probe, "labels": job.labels.tag, "val_top1_percent": test + 1,
            "test_top1_percent": test, "probe_config": dataclasses.asdict(config.probe_config())}


def _finish(store, study, cell, test):
    register(study, store, [cell])
    attempt = store.claim(cell.config_hash, "test:1")
    for job in cell.plan:
        if not job.done_in(store.probe_recipes(cell.config_hash)):
            assert store.add_probe_result(cell.config_hash, job.dataset, _record(study, job, test[job.probe]))
    store.end_attempt(cell.config_hash, attempt, "finished")


def _done(study, store, cell):
    [status] = study_status(study, store, [cell])
    return status.state, {job.probe for job in cell.plan if job.done_in(store.probe_recipes(cell.config_hash))}


def test_an_edited_probe_recipe_is_probed_again_and_the_old_result_is_kept_aside(tmp_path):
    study, cell = _study(tmp_path)
    with ResultsStore(study.store_path) as store:
        _finish(store, study, cell, {"lbfgs": 60.0, "sgd": 50.0})
        assert _done(study, store, cell) == ("done", {"lbfgs", "sgd"})

        # Each probe setting of the study file is part of the recipe: any edit leaves that probe to do.
        for l2_grid, sgd, left in [
            ([1.0, 0.01], None, "lbfgs"),
            (None, {"schedule": "paper_long"}, "sgd"),
            (None, {"epochs": 3}, "sgd"),
            (None, {"batch_size": 64}, "sgd"),
            (None, {"base_lr": 0.05}, "sgd"),
        ]:
            edited, edited_cell = _study(tmp_path, l2_grid, sgd)
            assert edited_cell.config_hash == cell.config_hash
            assert [j.key for j in edited_cell.plan] == [j.key for j in cell.plan]  # same keys, other recipe
            assert _done(edited, store, edited_cell) == ("left", {"lbfgs", "sgd"} - {left}), (l2_grid, sgd)
        # The same settings written out in full are the same recipe (paper is the default schedule).
        same, same_cell = _study(tmp_path, None, {"schedule": "paper"})
        assert _done(same, store, same_cell) == ("done", {"lbfgs", "sgd"})

        # Starting the edited study re-plans the L-BFGS probe: the old number is no longer current.
        edited, edited_cell = _study(tmp_path, [1.0, 0.01])
        register(edited, store, [edited_cell])
        assert store.runs()[0]["status"] == "pending"
        assert {(p["probe"], p["test_top1_percent"]) for p in store.probes()} == {("sgd", 50.0)}
        assert ",lbfgs," not in store.probes_csv()
        [old] = store.superseded()
        assert (old["probe"], old["test_top1_percent"]) == ("lbfgs", 60.0)
        # A worker that still reads the old study file cannot make the old recipe current again.
        [lbfgs_job] = [j for j in cell.plan if j.probe == "lbfgs"]
        assert store.add_probe_result(cell.config_hash, "fm", _record(study, lbfgs_job, 61.0)) is False
        assert [p["probe"] for p in store.probes()] == ["sgd"]

        _finish(store, edited, edited_cell, {"lbfgs": 70.0, "sgd": 0.0})
        assert {(p["probe"], p["test_top1_percent"]) for p in store.probes()} == {("lbfgs", 70.0), ("sgd", 50.0)}
        assert store.runs()[0]["status"] == "finished"

        # Back to the first recipe: its kept result is current again, nothing is probed twice.
        register(study, store, [cell])
        assert _done(study, store, cell) == ("done", {"lbfgs", "sgd"})
        assert {(p["probe"], p["test_top1_percent"]) for p in store.probes()} == {("lbfgs", 60.0), ("sgd", 50.0)}
        # One kept result per recipe: the stale worker's second one of the first recipe was not added.
        assert {(p["probe"], p["test_top1_percent"]) for p in store.superseded()} == {("lbfgs", 70.0)}


def test_the_plan_and_evaluate_agree_on_a_recipe_and_the_store_needs_no_evaluation_code():
    # The store leaves out the same speed-only fields as evaluate's recipe hash.
    assert NOT_IN_PROBE_RECIPE == NOT_IN_RECIPE
    cpu = dataclasses.asdict(EvalConfig(probe="sgd", device="cpu").probe_config())
    cuda = dataclasses.asdict(EvalConfig(probe="sgd", device="cuda").probe_config())
    assert probe_recipe_id(cpu) == probe_recipe_id(cuda) != probe_recipe_id(dict(cpu, epochs=3))
    assert probe_recipe_id(None) is None


def test_a_format_2_store_is_upgraded_and_results_of_todays_recipe_stay_done(tmp_path):
    path = tmp_path / "results.sqlite"
    shutil.copyfile(DATA / "store_v2.sqlite", path)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    raw.close()
    with ResultsStore(path, create=False) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION) and store.get_meta("migrated_from") == "2"
        # Each result's recipe comes from the probe_config its record kept.
        lbfgs = probe_recipe_id(dataclasses.asdict(EvalConfig(probe="lbfgs", dataset="fashion-mnist").probe_config()))
        sgd = probe_recipe_id(dataclasses.asdict(EvalConfig(probe="sgd", dataset="fashion-mnist", sgd_epochs=2).probe_config()))
        recipes = store.probe_recipes("a1b2c3d4e5f6")
        assert recipes == {("fm", "pre_logits", "lbfgs", "all"): lbfgs, ("fm", "pre_logits", "sgd", "all"): sgd}
        # Re-planned with the same recipes: nothing is superseded, the cell stays finished.
        store.register_run("a1b2c3d4e5f6", task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={}, run_dir="/runs/a1b2c3d4e5f6", plan=[(*key, r) for key, r in recipes.items()])
        assert store.runs()[0]["status"] == "finished" and store.superseded() == []
        assert [p["test_top1_percent"] for p in store.probes()] == [62.5, 55.0]
        # Planned with a longer SGD schedule: that result is set aside, and the cell has work left.
        store.register_run("a1b2c3d4e5f6", task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={}, run_dir="/runs/a1b2c3d4e5f6",
                           plan=[("fm", "pre_logits", "lbfgs", "all", lbfgs), ("fm", "pre_logits", "sgd", "all", "0123456789ab")])
        assert store.runs()[0]["status"] == "pending"
        assert [p["probe"] for p in store.probes()] == ["lbfgs"] and [p["probe"] for p in store.superseded()] == ["sgd"]


@pytest.mark.parametrize("plan_recipe, current", [(None, True), ("0123456789ab", False)])
def test_a_format_1_result_has_no_known_recipe_so_only_a_plan_without_one_counts_it(tmp_path, plan_recipe, current):
    path = tmp_path / "results.sqlite"
    shutil.copyfile(DATA / "store_v1.sqlite", path)
    with ResultsStore(path, create=False) as store:
        assert store.get_meta("migrated_from") == "1"
        assert set(store.probe_recipes("a1b2c3d4e5f6").values()) == {None}  # format 1 kept no probe_config
        store.register_run("a1b2c3d4e5f6", task="rotation", network="resnet50v1", width=2, representation_size=None,
                           config={}, run_dir="/runs/a1b2c3d4e5f6", plan=[("fm", "pre_logits", "lbfgs", "all", plan_recipe)])
        outputs = {p["output"] for p in store.probes("a1b2c3d4e5f6")}
        assert ("pre_logits" in outputs) is current and "block3" in outputs  # block3 is no longer planned: kept
        assert [p["output"] for p in store.superseded()] == ([] if current else ["pre_logits"])
        status = {r["config_hash"]: r["status"] for r in store.runs()}["a1b2c3d4e5f6"]
        assert status == ("finished" if current else "pending")


def test_two_evaluations_planning_one_result_with_different_settings_are_refused(tmp_path):
    """One stored result per (dataset, output, probe, labels): if two evaluations overlap there with
    different settings, keeping the first silently would report one recipe's number under the other's."""
    from pretextlab.errors import PretextlabError

    base = {
        "name": "overlap",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "epochs": 0.5, "batch_size": 16},
        "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1]}],
        "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 200, "test_limit": 100}},
    }
    first = {"outputs": ["block3", "pre_logits"], "probes": ["lbfgs"], "l2_grid": [1.0, 0.1]}
    clash = {"outputs": ["pre_logits"], "probes": ["lbfgs"], "l2_grid": [0.01]}
    with pytest.raises(PretextlabError, match=r"two evaluations ask for the lbfgs probe of pre_logits on fm .*different settings"):
        expand_cells(parse_study({**base, "evaluations": [first, clash]}, out=tmp_path / "a"))
    # The same settings twice plan the result once; disjoint outputs are no clash.
    [cell] = expand_cells(parse_study({**base, "evaluations": [first, dict(first)]}, out=tmp_path / "b"))
    assert sorted(job.output for job in cell.plan) == ["block3", "pre_logits"]
    [cell] = expand_cells(parse_study({**base, "evaluations": [first, {**clash, "outputs": ["block2"]}]}, out=tmp_path / "c"))
    assert sorted(job.output for job in cell.plan) == ["block2", "block3", "pre_logits"]
