"""A study on a real Slurm (issue 18): scripts/slurm_up.sh starts a one-node slurmctld/slurmd here,
and tiny cells run through `executor: slurm` as 2-rank DDP jobs on CPU (gloo).

- two cells train, probe and report end to end;
- one is preempted by `scancel --signal=TERM` mid-training, requeued and resumed, and its final
  weights equal those of the same cell run uninterrupted by 2 ranks with torchrun's environment,
  bit for bit (float64);
- the other's job is killed outright (its ranks SIGKILLed, as by the OOM killer or a lost node): the
  next `pretextlab study` takes it over and finishes it; no cell twice, no row lost;
- each cell's L-BFGS probe runs on both ranks of its job (extraction sharded into the one cache, the
  fit data-parallel) and its stored result is that of one process on the same checkpoint.

The `pretextlab study` commands and the uninterrupted reference's ranks are processes forked from
this one (tests/forked_cli.py, tests/forked_ranks.py): what is tested is the study and its Slurm
jobs, not an interpreter's start or torchrun's launcher (a real torchrun launch is tested in
tests/test_lbfgs_distributed.py, the `python -m pretextlab` entry point in tests/test_run_dir_faults.py).

Skips, saying why, only where Slurm cannot be started (not root, no apt, the daemons fail); with CI
or PRETEXTLAB_REQUIRE_SLURM set (.ci/run sets it) it fails instead, so CI never skips it silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

import pretextlab.cli  # noqa: F401  (imported before the forks: the forked study processes inherit it)
import pretextlab.training  # noqa: F401  (likewise: the reference's ranks train)
from forked_cli import ForkedCli
from forked_ranks import finish, forked_ranks, script, stop
from pretextlab.evaluate.probe_run import evaluate_run
from pretextlab.report import build_report
from pretextlab.study import expand_cells, load_study
from pretextlab.study.grid import probe_eval_config
from pretextlab.study.store import ResultsStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / "scripts" / "slurm_up.sh"
WORKER = Path(__file__).parent / "workers" / "ddp_train.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STUDY = ["study", "--no-progress"]


def _required() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in ("CI", "PRETEXTLAB_REQUIRE_SLURM"))


def _slurm_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: scripts/slurm_up.sh installs slurm-wlm and munge and starts their daemons"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    done = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return f"Slurm cannot start here: {(done.stderr.strip().splitlines() or ['no message'])[-1]}"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_missing_reason()
    if reason is not None:
        if _required():
            pytest.fail(f"the Slurm tests are required here (CI / PRETEXTLAB_REQUIRE_SLURM) but {reason}")
        pytest.skip(reason)


def _write_study(tmp_path: Path, networks: list[str]) -> Path:
    # 96 training images, 8 per rank and step: 6 steps. float64 makes the DDP run reproducible to
    # the bit across launchers (the same ops in the same order either way). No kNN monitor: it
    # changes no weight and would only add time.
    data = {
        "name": "slurm-tiny",
        "out": str(tmp_path / "study"),
        "pretext": {"dataset": "fashion-mnist", "limit": 128, "val_size": 32, "test_limit": 64, "epochs": 1, "batch_size": 8,
                    "log_every": 1, "checkpoint_every": 2, "monitor_every": 0, "precision": "fp64", "crop_scale": [0.6, 1.0]},
        "grids": [{"tasks": ["rotation"], "networks": networks, "widths": [1]}],
        "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 96, "test_limit": 64}},
        "evaluations": [{"outputs": ["pre_logits"], "probes": ["lbfgs"], "labels": ["all"], "l2_grid": [1.0]}],
        "runtime": {"device": "cpu", "feature_batch_size": 64},
        "executor": {"kind": "slurm", "parameters": {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "timeout_min": 20}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _wait_for(predicate, timeout: float, what: str, process: ForkedCli | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the study exited while waiting for {what}: {process.communicate()[1][-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _training_job(store_path: Path, run_dirs: Path, checkpointed: bool = False, other_than: str = "") -> tuple[str, str] | None:
    """(config hash, Slurm job id) of a cell past its first step (and its first checkpoint when
    ``checkpointed``) that has not finished training, else None."""
    if not store_path.exists():
        return None  # the study has not made its store yet (a new store appears whole: store_format.py)
    with ResultsStore(store_path, create=False) as store:
        running = [r for r in store.runs() if r["status"] == "running" and "@slurm:" in (r["owner"] or "")]
    for run in running:
        if run["config_hash"] == other_than:
            continue
        metrics = run_dirs / run["config_hash"] / "metrics.jsonl"
        stepped = metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines())
        saved = not checkpointed or (run_dirs / run["config_hash"] / "checkpoint.pt").exists()
        if stepped and saved and not (run_dirs / run["config_hash"] / "summary.json").exists():
            return run["config_hash"], run["owner"].rpartition("@slurm:")[2]
    return None


def _job_state(job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return next((f.split("=", 1)[1] for f in shown.stdout.split() if f.startswith("JobState=")), "")


def _task_pids(job_id: str) -> list[int]:
    """The pids of the job's tasks (its ranks), not of its batch script."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    raw_id = next(f.split("=", 1)[1] for f in shown.split() if f.startswith("JobId="))  # listpids wants it, not 14_1
    listed = subprocess.run(["scontrol", "listpids", raw_id], capture_output=True, text=True, check=True).stdout.split("\n")[1:]
    rows = [line.split() for line in listed if line.strip()]
    return [int(r[0]) for r in rows if r[2] != "batch" and r[3] != "-"]


def _network(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["network"]


def test_a_ddp_study_on_slurm_survives_preemption_and_a_killed_job(slurm, tmp_path, request):
    # One scenario, so the Slurm part costs four job starts (the suite's budget): cell A is
    # preempted (TERM) and requeued; cell B's ranks are then SIGKILLed; A resumes and finishes; the
    # next `pretextlab study` takes B over; A's weights equal an uninterrupted 2-rank run's.
    study_file = _write_study(tmp_path, ["resnet50v1", "resnet50v2(-)"])
    study = load_study(study_file)
    runs = study.directory / "runs"
    process = ForkedCli(STUDY + [str(study_file)], cwd=REPO, env=ENV)
    reference = []  # the uninterrupted run's ranks, none left running whatever happens
    request.addfinalizer(lambda: stop(reference))
    try:
        preempted, job_a = _wait_for(lambda: _training_job(study.store_path, runs), 240, "a cell in training", process)
        subprocess.run(["scancel", "--signal=TERM", job_a], check=True)
        # The preempted cell again, uninterrupted, by 2 ranks with torchrun's environment: started
        # now, in the background, while the study's jobs are requeued, killed and waited for.
        cell = next(c for c in expand_cells(study) if c.config_hash == preempted)
        dumps = tmp_path / "dumps"
        dumps.mkdir()
        reference += forked_ranks(script(WORKER), argv=[json.dumps(cell.config.to_dict()), str(tmp_path / "uninterrupted"), str(dumps)],
                                  env=ENV)
        # Requeued, A waits out Slurm's 120 s requeue hold (BeginTime) while B gets the CPUs.
        _wait_for(lambda: _job_state(job_a) == "PENDING", 60, f"job {job_a} requeued", process)
        with ResultsStore(study.store_path, create=False) as store:
            [stopped] = [r for r in store.runs() if r["config_hash"] == preempted]
        # The stop's message says how a study's cell continues, not `train --resume`.
        assert stopped["status"] == "interrupted" and f"pretextlab study {study_file}" in stopped["error"], stopped["error"]
        assert "--resume" not in stopped["error"]
        killed, job_b = _wait_for(lambda: _training_job(study.store_path, runs, checkpointed=True, other_than=preempted),
                                  240, "the other cell's first checkpoint", process)
        # Killed outright, as by the OOM killer or a lost node: no signal to react to. (`scancel
        # --signal=KILL` is a cancel in Slurm: TERM first, so the cell would checkpoint and stop cleanly.)
        for pid in _task_pids(job_b):
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: _job_state(job_b) == "FAILED", 60, f"job {job_b} to fail", process)
        # An administrator's StartTime=now lets A run again without the 120 s hold.
        subprocess.run(["scontrol", "update", f"JobId={job_a}", "StartTime=now"], check=True)
        output, errors = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    shown = json.loads(output.strip().splitlines()[-1])
    assert process.returncode == 1 and (shown["cells"], shown["done"]) == (2, 1), errors[-3000:]
    assert list(shown["errors"]) == [killed] and f"job {job_b} ended FAILED without a result" in shown["errors"][killed]
    with ResultsStore(study.store_path) as store:
        assert {r["config_hash"]: r["status"] for r in store.runs()} == {preempted: "finished", killed: "running"}

    again = ForkedCli(STUDY + [str(study_file)], cwd=REPO, env=ENV)
    again_output, again_errors = again.communicate(timeout=300)
    assert again.returncode == 0, again_errors[-3000:]
    assert "its worker died or went silent: will resume" in again_errors
    assert json.loads(again_output)["jobs"]["ranks_per_job"] == 2

    with ResultsStore(study.store_path) as store:
        rows, attempts, probes, curves = store.runs(), store.attempts(), store.probes(), store.curves()
    # Each cell once, finished, trained by 2 ranks on 1 node for all its steps.
    assert sorted((r["status"], r["ranks"], r["nodes"], r["steps"], r["summary"]["world_size"]) for r in rows) == [("finished", 2, 1, 6, 2)] * 2
    outcomes = {h: [a["outcome"] for a in attempts if a["config_hash"] == h] for h in (preempted, killed)}
    assert outcomes == {preempted: ["interrupted", "finished"], killed: ["abandoned", "finished"]}, outcomes
    # Both resumed from a checkpoint, not from scratch: A where TERM stopped it, B from step 2 or later.
    assert [1 <= a["start_step"] < 6 for a in attempts if a["outcome"] == "finished"] == [True, True]
    # Every loss step once per cell: none lost to the kill, none repeated by a resume.
    for config_hash in (preempted, killed):
        assert sorted(c["step"] for c in curves if c["config_hash"] == config_hash and c["name"] == "loss") == list(range(1, 7))
    assert len(probes) == 2 and all(10.0 < p["test_top1_percent"] <= 100.0 for p in probes)
    markdown = build_report(study.store_path, tmp_path / "report").markdown.read_text()
    assert "| resnet50v1 | 1 |" in markdown and "| resnet50v2(-) | 1 |" in markdown
    # Both ranks probed: each split's features went into the one cache, filled by 2 ranks.
    for config_hash in (preempted, killed):
        records = [json.loads(p.read_text()) for p in (runs / config_hash / "features").glob("*/*/meta.json")]
        assert sorted(r["outputs"]["pre_logits"]["ranks"] for r in records) == [2, 2, 2], records

    # The uninterrupted run's ranks are done by now (or soon): the same weights as the Slurm cell's, to the bit.
    reference_errors = [err for _, err in finish(reference)]
    assert [rank.returncode for rank in reference] == [0, 0], [err[-3000:] for err in reference_errors]
    slurm_weights, reference_weights = _network(runs / preempted), _network(tmp_path / "uninterrupted")
    assert slurm_weights.keys() == reference_weights.keys()
    for name in reference_weights:
        torch.testing.assert_close(slurm_weights[name], reference_weights[name], rtol=0, atol=0, msg=name)

    # One process probing the same checkpoint (extracting afresh) stores the same result: equal, or
    # one image apart where float32 sums in another order flip a prediction (the sharded fit itself
    # is pinned to one process's in float64 by test_lbfgs_distributed). Last: no fork may follow
    # this process's use of a thread pool (a forked child's GNU OpenMP could hang).
    alone = tmp_path / "alone"
    shutil.copytree(runs / preempted, alone, ignore=shutil.ignore_patterns("features", "probes"))
    [job] = cell.plan
    config = probe_eval_config(study, job.dataset, job.probe, job.labels, job.l2_grid, job.sgd, (job.output,))
    [single] = evaluate_run(alone, config, progress=False, log=lambda message: None)
    [stored] = [p for p in probes if p["config_hash"] == preempted]
    for split in ("val", "test"):
        one_image = 100.0 / single[f"{split}_images"]
        assert abs(stored[f"{split}_top1_percent"] - single[f"{split}_top1_percent"]) <= one_image + 1e-9, (split, stored, single)
