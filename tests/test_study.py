"""Studies: the study file is checked key by key, the grid expands to cells keyed by config hash, and
a tiny real grid (Fashion-MNIST, width 1) is killed mid-run, resumed on submitit's local executor,
finishes every cell exactly once, and its report is rebuilt from the store."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported before the forks: the forked study processes inherit it)
import yaml

import pretextlab.cli  # noqa: F401  (likewise)
import pretextlab.training  # noqa: F401  (likewise: an inline study trains in its own process)
from forked_cli import ForkedCli
from pretextlab.errors import PretextlabError
from pretextlab.report import build_report
from pretextlab.study.store import ResultsStore
from pretextlab.study import expand_cells, load_study, parse_study, run_study

REPO = Path(__file__).resolve().parents[1]


def _study_dict(**changes):
    data = {
        "name": "t",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "test_limit": 100, "epochs": 0.5, "batch_size": 16},
        "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1", "resnet50v2(-)"], "widths": [1]}],
        "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 200, "test_limit": 100}},
        "evaluations": [{"outputs": ["block4", "pre_logits"], "probes": ["lbfgs"], "labels": ["all", 5]}],
    }
    data.update(changes)
    return data


def _refused(data, tmp_path, *fragments):
    with pytest.raises(PretextlabError) as caught:
        parse_study(data, out=tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


def test_unknown_key_task_network_and_others_are_refused_with_the_choices(tmp_path):
    _refused(_study_dict(grid_size=3), tmp_path, "'grid_size'", "valid keys are name, out, pretext, grids")
    bad_grid = [{"tasks": ["rotaton"], "networks": ["resnet50v1"], "widths": [1]}]
    _refused(_study_dict(grids=bad_grid), tmp_path, "unknown task 'rotaton'", "grids[0].tasks", "rotation, exemplar, jigsaw, relative_patch")
    bad_grid = [{"tasks": ["rotation"], "networks": ["resnet50"], "widths": [1]}]
    message = _refused(_study_dict(grids=bad_grid), tmp_path, "unknown network 'resnet50'", "resnet50v1", "resnet50v2(-)", "revnet50(-)", "vgg19bn")
    assert "resnet50v1(-)" not in message  # v1 always has its final ReLU: no "(-)" variant to offer
    _refused(_study_dict(grids=[{"tasks": ["rotation"], "networks": ["resnet50v1(-)"], "widths": [1]}]), tmp_path, "unknown network 'resnet50v1(-)'")
    _refused(_study_dict(grids=[{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1], "depth": 50}]), tmp_path, "'depth'", "grids[0]")
    _refused(_study_dict(grids=[{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [0]}]), tmp_path, "width 0", ">= 1")
    _refused(_study_dict(evaluations=[{"outputs": ["block9"]}]), tmp_path, "unknown output 'block9'", "pre_logits", "all")
    _refused(_study_dict(evaluations=[{"outputs": ["fc6"]}]), tmp_path, "unknown output 'fc6'")  # ResNets have no fc6
    _refused(_study_dict(evaluations=[{"probes": ["svm"]}]), tmp_path, "unknown probe 'svm'", "lbfgs, sgd, mlp")
    _refused(_study_dict(evaluations=[{"labels": [1.5]}]), tmp_path, "label budget 1.5")
    _refused(_study_dict(evaluations=[{"datasets": ["imagenet"]}]), tmp_path, "unknown downstream dataset 'imagenet'", "fm")
    _refused(_study_dict(evaluations=[{"where": {"colour": ["red"]}}]), tmp_path, "'colour'", "tasks, networks, widths, representation_sizes")
    _refused(_study_dict(pretext={"task": "rotation"}), tmp_path, "'task'", "set by the grid")
    _refused(_study_dict(pretext={"learning_rate": 0.1}), tmp_path, "'learning_rate'", "base_lr")
    _refused(_study_dict(pretext={"dataset": "fashion-mnist", "epochs": -1}), tmp_path, "epochs must be > 0")
    _refused(_study_dict(downstream={"fm": {"dataset": "cifar"}}), tmp_path, "unknown dataset 'cifar'", "fashion-mnist, folder")
    _refused(_study_dict(executor={"kind": "kubernetes"}), tmp_path, "unknown executor 'kubernetes'", "inline, local, slurm")
    # Executor parameters are submitit's own, checked by submitit when the study starts.
    study = parse_study(_study_dict(executor={"kind": "local", "parameters": {"gpus": 1}}), out=tmp_path / "s")
    with pytest.raises(PretextlabError, match="'gpus'.*not valid for submitit's local executor|not valid for submitit's local executor.*gpus"):
        run_study(study, echo=lambda line: None)
    # From a file, the message also names the file.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_study_dict(grids=[{"tasks": ["rotation"], "networks": ["alexnet"], "widths": [1]}])))
    with pytest.raises(PretextlabError, match=r"bad\.yaml.*unknown network 'alexnet'"):
        load_study(path)


def test_grid_expands_to_cells_keyed_by_config_hash(tmp_path):
    data = _study_dict(
        grids=[
            {"tasks": ["rotation", "exemplar"], "networks": ["resnet50v1", "revnet50(-)"], "widths": [1, 2]},
            # Overlaps the first grid on (rotation, resnet50v1, 1): the same cell, not a second one.
            {"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1], "representation_sizes": [None, 64]},
        ],
        evaluations=[
            {"outputs": ["all"], "probes": ["lbfgs"]},
            {"outputs": ["pre_logits"], "probes": ["mlp"], "labels": [10, 0.1], "where": {"widths": [2]}},
        ],
    )
    study = parse_study(data, out=tmp_path / "s")
    cells = expand_cells(study)
    assert len(cells) == 2 * 2 * 2 + 1
    assert len({c.config_hash for c in cells}) == len(cells)
    by_label = {c.label: c for c in cells}
    rev = by_label["exemplar revnet50(-) k=2"]
    assert rev.config.network == "revnet50" and rev.config.final_relu is False and rev.config.width == 2
    assert by_label["rotation resnet50v1 k=1"].config.final_relu is True
    assert by_label["rotation resnet50v1 k=1 d=64"].config.representation_size == 64
    assert rev.run_dir == (tmp_path / "s" / "runs" / rev.config_hash).resolve()
    # "all" expands to the network's own outputs; the mlp / few-label evaluation only where k=2.
    assert {j.key for j in rev.plan} == {("fm", o, "lbfgs", "all") for o in ("block1", "block2", "block3", "block4", "pre_logits")} | {
        ("fm", "pre_logits", "mlp", "10pc"), ("fm", "pre_logits", "mlp", "0.1frac")
    }
    assert {j.probe for j in by_label["rotation resnet50v1 k=1"].plan} == {"lbfgs"}
    # The hash is the pretext config's: the same study read twice gives the same cells.
    assert [c.config_hash for c in expand_cells(parse_study(data, out=tmp_path / "s"))] == [c.config_hash for c in cells]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_tiny_study_is_killed_resumed_on_the_local_executor_and_reported(tmp_path):
    out = tmp_path / "study"
    data = _study_dict(out=str(out))
    # 6 steps of 10 per epoch. No kNN monitor: it changes no weight (tests/test_knn_monitor.py is its test).
    data["pretext"].update(epochs=0.6, checkpoint_every=1, log_every=1, crop_scale=[0.6, 1.0], monitor_every=0)
    data["evaluations"][0]["l2_grid"] = [1.0, 0.01]
    data["runtime"] = {"device": "cpu", "feature_batch_size": 100}
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(data, sort_keys=False))
    store_path = out / "results.sqlite"
    # One thread per process: two processes (a job each) on the shared cores, not four spinning threads.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # The study commands run forked from this process (tests/forked_cli.py): what is tested is the
    # study, not the interpreter's start (tests/test_run_dir_faults.py runs `python -m pretextlab`).
    command = ["study", str(study_file), "--no-progress"]

    # 1. Run inline and kill -9 the process once the first cell has a checkpoint but has not finished.
    process = ForkedCli(command, cwd=REPO, env=env)
    try:
        runs = out / "runs"

        def mid_run():
            return any((d / "checkpoint.pt").exists() and not (d / "summary.json").exists() for d in runs.glob("*")) if runs.exists() else False

        _wait_for(mid_run, 120, "a checkpoint of an unfinished run")
        shown = []
        status = run_study(load_study(study_file), dry_run=True, echo=shown.append)
        assert [s.state for s in status.statuses].count("running") == 1, shown
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed = next(d.name for d in runs.glob("*") if (d / "checkpoint.pt").exists() and not (d / "summary.json").exists())

    # The dead worker's cell is 'left' at once (its pid is gone), not 'running' until a timeout.
    shown = []
    status = run_study(load_study(study_file), dry_run=True, echo=shown.append)
    assert {s.state for s in status.statuses} == {"left"}, shown
    assert "its worker died or went silent: will resume" in "\n".join(shown)

    # 2. Resume: both cells as parallel jobs of submitit's local executor, writing the same store.
    resumed = ForkedCli(command + ["--executor", "local"], cwd=REPO, env=env)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout + stderr
    assert "2 cells: 2 done, 0 running, 0 left" in stderr  # people read stderr; stdout is JSON
    assert json.loads(stdout.strip().splitlines()[-1])["done"] == 2
    assert len(list((out / "submitit").rglob("*_result.pkl"))) == 2

    with ResultsStore(store_path) as store:
        runs_rows = store.runs()
        probes = store.probes()
        attempts = store.attempts()
        planned = store.planned()
    assert len(runs_rows) == 2 and {r["status"] for r in runs_rows} == {"finished"}
    assert all(r["steps"] == 6 and r["pretext_val_accuracy_percent"] is not None for r in runs_rows)
    # Every cell finished exactly once; the killed one was resumed from its checkpoint, not restarted.
    for run in runs_rows:
        outcomes = [a["outcome"] for a in attempts if a["config_hash"] == run["config_hash"]]
        assert outcomes.count("finished") == 1
        if run["config_hash"] == killed:
            assert outcomes == ["abandoned", "finished"]
            assert [a["start_step"] for a in attempts if a["config_hash"] == killed][-1] >= 1
        else:
            assert outcomes in (["finished"], ["abandoned", "finished"])  # killed before or after it started
    # Each planned probe result is there once: 2 cells x 2 outputs x 2 label budgets.
    keys = [(p["config_hash"], p["dataset"], p["output"], p["probe"], p["labels"]) for p in probes]
    assert len(keys) == len(set(keys)) == len(planned) == 8
    # Each result's recipe (from the probe_config evaluate stored) is the one its plan asked for.
    planned_recipes = {(p["config_hash"], p["dataset"], p["output"], p["probe"], p["labels"]): p["recipe"] for p in planned}
    assert all(p["recipe"] is not None and planned_recipes[key] == p["recipe"] for key, p in zip(keys, probes))
    assert all(10.0 < p["test_top1_percent"] <= 100.0 and p["chosen"]["l2"] in (1.0, 0.01) for p in probes)
    assert {p["train_images"] for p in probes} == {160, 50}  # all labels of the 160-image train split, and 5 per class

    # 3. A third start finds nothing to do and changes nothing.
    shown = []
    again = run_study(load_study(study_file), echo=shown.append)
    assert again.ok and again.ran == {} and "2 cells: 2 done, 0 running, 0 left" in shown[-1]
    with ResultsStore(store_path) as store:
        assert len(store.attempts()) == len(attempts) and len(store.probes()) == 8

    # 4. The report, from the store alone (the run directories are gone).
    shutil.rmtree(runs)
    report = build_report(store_path, tmp_path / "report")
    markdown = report.markdown.read_text()
    assert "| resnet50v1 | 1 |" in markdown and "| resnet50v2(-) | 1 |" in markdown and report.missing_cells == 0
    for stem in ("by_output_fm", "by_width_fm", "pretext_vs_downstream_fm", "linear_vs_mlp_fm", "few_labels_fm",
                 "width_by_representation_fm", "sgd_convergence_fm", "pretext_training"):
        assert report.figures[stem].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({stem}.png)" in markdown
    # No mlp, sgd or representation-size runs in this grid: those figures say so instead of drawing.
    assert sorted(report.empty_figures) == ["linear_vs_mlp_fm", "sgd_convergence_fm", "width_by_representation_fm"]
    for run in runs_rows:
        assert f'<a id="run-{run["config_hash"]}"></a>' in markdown
        assert f"(#run-{run['config_hash']})" in markdown


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"grids": 3}, ["grids must be a non-empty list of mappings", "got 3 (a whole number)"]),
        ({"evaluations": "lbfgs"}, ["evaluations must be a non-empty list of mappings", "got 'lbfgs' (a string)"]),
        ({"evaluations": [{"sgd": {"base_lr": True}}]}, ["evaluations[0].sgd.base_lr must be a number > 0", "True"]),
        ({"downstream": {"fm": {"dataset": "fashion-mnist", "limit": "200"}}}, ["downstream.fm.limit must be a whole number >= 1 or null", "'200' (a string)"]),
        ({"downstream": {"fm": {"dataset": "fashion-mnist", "val_size": "10%"}}}, ["downstream.fm.val_size must be a number", "'10%'"]),
        ({"downstream": {"fm": {"dataset": "fashion-mnist", "seed": 1.5}}}, ["downstream.fm.seed must be a whole number", "1.5 (a number)"]),
        ({"downstream": {"fm": {"dataset": "fashion-mnist", "data_dir": 7}}}, ["downstream.fm.data_dir must be a directory path", "7"]),
        ({"downstream": {"fm": {"dataset": ["fashion-mnist"]}}}, ["downstream.fm.dataset must be a dataset name", "(a list)"]),
        ({"runtime": {"device": 0}}, ["runtime.device must be a device name", "got 0"]),
        ({"runtime": {"stale_seconds": True}}, ["runtime.stale_seconds must be a number of seconds"]),
        ({"runtime": {"workers": "two"}}, ["runtime.workers must be a whole number >= 0", "'two'"]),
        ({"executor": {"kind": "local", "parameters": "fast"}}, ["executor.parameters must be a mapping", "'fast' (a string)"]),
        ({"executor": {"kind": ["local"]}}, ["executor.kind must be a string", "(a list)"]),
        ({"out": 5}, ["out must be a directory path (a string)", "got 5"]),
    ],
)
def test_wrong_yaml_types_outside_the_pretext_section_name_key_value_and_type(tmp_path, change, fragments):
    _refused(_study_dict(**change), tmp_path, *fragments)


def _finished_record(study, job, val=50.0):
    """The record evaluate stores for a planned probe job (its resolved probe config included), as
    if the cell had probed it: a finished cell without training anything."""
    import dataclasses

    from pretextlab.study.grid import probe_eval_config

    config = probe_eval_config(study, job.dataset, job.probe, job.labels, job.l2_grid, job.sgd, (job.output,))
    return {"output": job.output, "probe": job.stored_probe, "labels": job.labels.tag, "val_top1_percent": val,
            "test_top1_percent": val - 1, "probe_config": dataclasses.asdict(config.probe_config())}


def test_dry_run_creates_nothing_and_writes_nothing(tmp_path, capsys):
    import json

    from pretextlab.cli import main

    out = tmp_path / "study"
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(_study_dict(out=str(out))))
    assert main(["study", str(study_file), "--dry-run", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
    assert "2 cells: 0 done, 0 running, 2 left" in captured.err and "not started yet" in captured.err
    assert json.loads(captured.out) == {"study": "t", "directory": str(out.resolve()), "dry_run": True, "cells": 2,
                                        "done": 0, "running": 0, "left": 2, "job_ids": [], "errors": {}}

    # With a store already there, a dry run reads it and changes nothing in it, even when the study
    # file now plans more probes (that cell is shown as left; only a real start registers the plan).
    study = load_study(study_file)
    with ResultsStore(study.store_path) as store:
        from pretextlab.study import register

        register(study, store, expand_cells(study))
        cell = expand_cells(study)[0]
        attempt = store.claim(cell.config_hash, "test:1")
        for job in cell.plan:
            store.add_probe_result(cell.config_hash, job.dataset, _finished_record(study, job))
        store.end_attempt(cell.config_hash, attempt, "finished")
    data = _study_dict(out=str(out))
    data["evaluations"].append({"outputs": ["block3"], "probes": ["lbfgs"]})
    study_file.write_text(yaml.safe_dump(data))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shown = []
    outcome = run_study(load_study(study_file), dry_run=True, echo=shown.append)
    assert [s.state for s in outcome.statuses] == ["left", "left"] and outcome.ran == {}
    assert f"{cell.label:<40} {cell.config_hash:<12} left       4/5" in "\n".join(shown)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_cells_dataset_and_sgd_settings_reach_eval_config_by_field():
    # Issue 15: the study's downstream-dataset and SGD sections hand their fields to EvalConfig by
    # name (sgd_ prefixed), so a setting added to both cannot be forgotten in between.
    import dataclasses

    from pretextlab.evaluate.probe_run import EvalConfig
    from pretextlab.study.model import DownstreamDataset, SgdSettings

    dataset = DownstreamDataset(name="places", dataset="folder", data_dir="d", val_size=0.1, limit=50, test_limit=40, seed=3)
    sgd = SgdSettings(schedule="paper_long", epochs=4, batch_size=32, base_lr=0.2, preset="precomputed")
    config = EvalConfig(**dataset.eval_options(), **sgd.eval_options())
    assert (config.dataset, config.data_dir, config.val_size, config.limit, config.test_limit, config.seed) == (
        "folder", "d", 0.1, 50, 40, 3)
    assert (config.sgd_schedule, config.sgd_epochs, config.sgd_batch_size, config.sgd_base_lr, config.sgd_preset) == (
        "paper_long", 4, 32, 0.2, "precomputed")
    eval_fields = {f.name for f in dataclasses.fields(EvalConfig)}
    assert set(dataset.eval_options()) | set(sgd.eval_options()) <= eval_fields


class _FakeSlurm:
    """A Slurm array of four cell jobs on a fake clock (seconds advance only when the study sleeps):
    7_0 runs until t=30; 7_1's ranks die at t=13 (FAILED, no result); 7_2 and 7_3 wait as one
    pending line (ArrayTaskId=2-3%2, as scontrol shows an array's unstarted rest) until t=13, then
    finish at t=16 and t=22. Answers `scontrol show job -o ID` and stands in for submitit's jobs."""

    FINISH = {0: 30.0, 2: 16.0, 3: 22.0}

    def __init__(self, folder: Path):
        self.now = 0.0
        self.asked: list[str] = []
        self.folder = folder

    # The parts of the time module the study's wait uses.
    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def _state(self, task: int) -> str:
        if task == 1:
            return "RUNNING" if self.now < 13 else "FAILED"
        if self.now >= self.FINISH[task]:
            return "COMPLETED"
        return "PENDING" if task >= 2 and self.now < 13 else "RUNNING"

    def scontrol(self, command, **kwargs):
        assert command[:4] == ["scontrol", "show", "job", "-o"], command
        self.asked.append(command[4])
        lines = [f"JobId={100 + t} JobName=pretextlab-t ArrayJobId=7 ArrayTaskId={t} JobState={self._state(t)} Reason=None"
                 for t in (0, 1)]
        if self.now < 13:
            lines.append("JobId=7 JobName=pretextlab-t ArrayJobId=7 ArrayTaskId=2-3%2 JobState=PENDING Reason=JobArrayTaskLimit")
        else:
            lines += [f"JobId={100 + t} JobName=pretextlab-t ArrayJobId=7 ArrayTaskId={t} JobState={self._state(t)} Reason=None"
                      for t in (2, 3)]
        array, _, task = command[4].partition("_")
        shown = [line for line in lines if not task or f"ArrayTaskId={task} " in line]
        return subprocess.CompletedProcess(command, 0 if array == "7" else 1, "\n".join(shown) + "\n", "")

    def job(self, task: int):
        slurm = self

        class Job:
            job_id = f"7_{task}"
            paths = type("Paths", (), {"folder": self.folder / f"7_{task}"})

            def done(self) -> bool:  # submitit's: the result file is there
                return task in slurm.FINISH and slurm.now >= slurm.FINISH[task]

            def results(self) -> list[str]:
                return ["finished", "finished"]

        return Job()


def test_a_dead_slurm_job_is_reported_while_the_jobs_before_it_still_run(tmp_path, monkeypatch):
    """The study waits for all its jobs at once: a job that ended without a result (ranks killed)
    is reported (echoed, and failed in the outcome) its grace period after it ended, while the job
    listed before it still runs, not once that job has finished; each pass asks slurmctld once for
    the whole array (scontrol by array id), reading an unstarted rest of the array (ArrayTaskId=2-3%2);
    the outcome lists the cells in their order, not the order their jobs ended in."""
    from pretextlab.study import executors

    study_file = tmp_path / "s.yaml"
    grids = [{"tasks": ["rotation"], "networks": ["resnet50v1", "resnet50v2(-)"], "widths": [1, 2]}]
    study_file.write_text(yaml.safe_dump(_study_dict(out=str(tmp_path / "s"), grids=grids, executor={"kind": "slurm"})))
    study = load_study(study_file)
    cells = expand_cells(study)
    slurm = _FakeSlurm(tmp_path / "submitit")
    jobs = [slurm.job(task) for task in range(4)]
    monkeypatch.setattr(subprocess, "run", slurm.scontrol)
    monkeypatch.setattr(executors, "time", slurm)
    monkeypatch.setattr(executors, "_make_executor", lambda study, kind: type("Submitter", (), {"map_array": lambda *a: jobs})())
    echoed = []
    ran, errors, job_ids = executors.run_submitit(study, "slurm", cells, wait=True, progress=False,
                                                  echo=lambda line: echoed.append((slurm.now, line)))
    assert job_ids == ["7_0", "7_1", "7_2", "7_3"]
    [(reported_at, line)] = [(t, line) for t, line in echoed if line.startswith("failed: ")]
    assert f"job 7_1 ended FAILED without a result" in line and cells[1].label in line
    assert 13 + executors.OTHER_GRACE_SECONDS < reported_at <= 13 + executors.OTHER_GRACE_SECONDS + 1 < 30
    assert slurm.now == 30  # done when the last job is, not a grace period later
    assert set(slurm.asked) == {"7"} and len(slurm.asked) == 31  # one query per one-second pass, t=0..30
    assert list(ran) == [c.config_hash for c in cells] and list(errors) == [cells[1].config_hash]
    assert [ran[c.config_hash] for c in cells] == ["finished", "failed", "finished", "finished"]
