"""A cell's job shape (issue 18): the store records how many ranks on how many nodes ran a cell
(format 4, upgraded from 3), a requeued cluster job takes its own cell back at once, and the study
file's executor block is checked and shown by --dry-run."""

import shutil
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from pretextlab.errors import PretextlabError
from pretextlab.study import parse_study, run_study
from pretextlab.study.store import ResultsStore, worker_id
from pretextlab.study.store_format import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"


def test_a_format_3_store_is_upgraded_and_claims_record_ranks_nodes_and_hosts(tmp_path):
    path = tmp_path / "results.sqlite"
    shutil.copy(DATA / "store_v3.sqlite", path)  # written by the format-3 code (tests/data/make_store_v3.py)
    with ResultsStore(path) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "4" and store.get_meta("migrated_from") == "3"
        runs = {r["config_hash"]: r for r in store.runs()}
        # The trained cell's ranks come from its summary's world_size; where it ran is unknown.
        assert (runs["a1b2c3d4e5f6"]["ranks"], runs["a1b2c3d4e5f6"]["nodes"], runs["a1b2c3d4e5f6"]["hosts"]) == (2, None, None)
        assert runs["0f0e0d0c0b0a"]["ranks"] is None
        attempt = store.claim("a1b2c3d4e5f6", worker_id("slurm:42"), ranks=16, nodes=2, hosts="gpu01,gpu02")
        row = next(r for r in store.runs() if r["config_hash"] == "a1b2c3d4e5f6")
        assert (row["ranks"], row["nodes"], row["hosts"], row["status"]) == (16, 2, "gpu01,gpu02", "running")
        assert [(a["ranks"], a["nodes"], a["hosts"]) for a in store.attempts("a1b2c3d4e5f6")] == [(None, None, None), (16, 2, "gpu01,gpu02")]
        assert attempt is not None
        # An inline cell: one rank on this host.
        store.claim("0f0e0d0c0b0a", worker_id())
        row = next(r for r in store.runs() if r["config_hash"] == "0f0e0d0c0b0a")
        assert (row["ranks"], row["nodes"], row["hosts"]) == (1, 1, socket.gethostname())
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 3


def test_a_requeued_job_takes_its_own_cell_back_at_once_another_job_waits(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        store.register_run("aaaa00000001", task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={}, run_dir=str(tmp_path / "r"))
        # Job 77's first run, on another node, beat a moment ago (a live process as far as this host can tell).
        assert store.claim("aaaa00000001", "gpu07:4711@slurm:77", ranks=8, nodes=1, hosts="gpu07") is not None
        assert store.claim("aaaa00000001", "gpu09:1234@slurm:78") is None
        assert store.claim("aaaa00000001", "gpu09:1234") is None
        # Requeued, job 77 runs again elsewhere: the cell is its own, taken over without waiting for staleness.
        assert store.claim("aaaa00000001", "gpu09:99@slurm:77", ranks=8, nodes=1, hosts="gpu09") is not None
        assert [a["outcome"] for a in store.attempts()] == ["abandoned", None]
        # A stale heartbeat still frees it for anyone (stale_seconds is the study's runtime setting).
        time.sleep(0.05)
        assert store.claim("aaaa00000001", "gpu10:5@slurm:80", stale_seconds=0.01) is not None


def _study(tmp_path, **parameters):
    data = {
        "name": "t",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "test_limit": 100, "epochs": 0.5, "batch_size": 16},
        "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1", "revnet50"], "widths": [1, 2]}],
        "downstream": {"fm": {"dataset": "fashion-mnist", "limit": 200, "test_limit": 100}},
        "evaluations": [{"outputs": ["pre_logits"], "probes": ["lbfgs"]}],
        "executor": {"kind": "slurm", "parameters": parameters},
    }
    return parse_study(data, out=tmp_path / "s")


@pytest.mark.parametrize("parameters, fragment", [
    ({"nodes": 0}, "executor.parameters.nodes must be a whole number >= 1, got 0"),
    ({"tasks_per_node": "8"}, "executor.parameters.tasks_per_node must be a whole number >= 1, got '8'"),
    ({"gpus_per_node": 1.5}, "executor.parameters.gpus_per_node must be a whole number >= 0, got 1.5"),
    ({"gpus_per_node": 8}, "tasks_per_node (1) must equal gpus_per_node (8): a cell's job runs one DDP rank per GPU, so set tasks_per_node: 8"),
])
def test_the_job_shape_is_checked(tmp_path, parameters, fragment):
    with pytest.raises(PretextlabError) as caught:
        _study(tmp_path, **parameters)
    assert fragment in str(caught.value)


def test_dry_run_shows_the_jobs_it_would_submit_and_creates_nothing(tmp_path):
    study = _study(tmp_path, nodes=2, tasks_per_node=8, gpus_per_node=8, timeout_min=2880, slurm_partition="gpu",
                   slurm_array_parallelism=3)
    shown = []
    outcome = run_study(study, dry_run=True, echo=shown.append)
    assert outcome.jobs == {
        "executor": "slurm", "jobs": 4, "nodes": 2, "tasks_per_node": 8, "ranks_per_job": 16, "gpus_per_node": 8,
        "timeout_min": 2880, "partition": "gpu", "jobs_at_once": 3, "gpus_at_once": 48,
    }
    assert shown[-1] == ("would submit 4 slurm job(s) on partition gpu, each 2 node(s) x 8 task(s) (16 DDP rank(s)), "
                         "8 GPU(s) per node (3 job(s) at once: 48 GPUs), time limit 2880 min")
    assert not (tmp_path / "s").exists()
