"""The results store: WAL SQLite, unique probe rows, claiming cells from dead or silent workers, and
two processes writing at once without losing a row."""

import csv
import io
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretextlab.cli import main
from pretextlab.errors import PretextlabError
from pretextlab.study.store import ResultsStore, locate_store, worker_id

HOST = socket.gethostname()


def _record(output="pre_logits", probe="lbfgs", labels="all", val=0.5, test=0.4):
    return {"output": output, "probe": probe, "labels": labels, "val_top1": val, "test_top1": test,
            "chosen": {"l2": 0.01}, "feature_dim": 512, "train_images": 900, "seconds": 1.5}


def _store_with_run(path: Path, config_hash: str = "aaaa00000001") -> ResultsStore:
    store = ResultsStore(path)
    store.register_run(config_hash, task="rotation", network="resnet50v2(-)", width=2, representation_size=None,
                       config={"task": "rotation", "width": 2}, run_dir=str(path.parent / config_hash),
                       plan=[("fm", "pre_logits", "lbfgs", "all"), ("fm", "block4", "lbfgs", "all")])
    return store


def test_store_is_wal_and_probe_rows_are_unique(tmp_path):
    path = tmp_path / "results.sqlite"
    with _store_with_run(path) as store:
        assert store.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.add_probe_result("aaaa00000001", "fm", _record()) is True
        # The same (run, dataset, output, probe, labels) again is a no-op, not a second row.
        assert store.add_probe_result("aaaa00000001", "fm", _record(val=0.9)) is False
        assert store.add_probe_result("aaaa00000001", "fm", _record(labels="10pc")) is True
        # Registering the cell again keeps its results; its plan becomes the new one.
        store.register_run("aaaa00000001", task="rotation", network="resnet50v2(-)", width=2, representation_size=None,
                           config={}, run_dir=str(tmp_path / "moved"), plan=[("fm", "pre_logits", "lbfgs", "all")])
        rows = store.probes()
        # Records with the older fraction fields are stored in percent, as the columns say.
        assert [(r["labels"], r["val_top1_percent"]) for r in rows] == [("10pc", 50.0), ("all", 50.0)]
        assert rows[0]["network"] == "resnet50v2(-)" and rows[0]["chosen"] == {"l2": 0.01}
        assert [p["output"] for p in store.planned()] == ["pre_logits"]
        assert store.runs()[0]["run_dir"] == str(tmp_path / "moved")
        with pytest.raises(PretextlabError, match="needs 'probe'"):
            store.add_probe_result("aaaa00000001", "fm", {"output": "x", "labels": "all"})
    # A second connection (another process would do the same) sees everything.
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT COUNT(*) FROM probes").fetchone()[0] == 2


def test_claim_skips_live_workers_and_takes_over_dead_or_silent_ones(tmp_path):
    with _store_with_run(tmp_path / "results.sqlite") as store:
        me = worker_id()
        first = store.claim("aaaa00000001", me)
        assert first is not None and store.runs()[0]["status"] == "running"
        # Another live process of this machine (a sleeping child) cannot take it while it beats.
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with ResultsStore(store.path) as other:
                assert other.claim("aaaa00000001", f"{HOST}:{sleeper.pid}") is None
        finally:
            sleeper.kill()
            sleeper.wait()
        store.end_attempt("aaaa00000001", first, "interrupted", error="stopped")
        assert store.runs()[0]["status"] == "interrupted"

        # A dead process of this machine holds it: taken over at once, its attempt marked abandoned.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_owner = f"{HOST}:{int(dead.stdout)}"
        assert store.claim("aaaa00000001", dead_owner) is not None
        taken = store.claim("aaaa00000001", me)
        assert taken is not None
        assert [a["outcome"] for a in store.attempts()] == ["interrupted", "abandoned", None]

        # A worker on another machine: its cell is free only once its heartbeat is stale.
        store.end_attempt("aaaa00000001", taken, "failed", error="boom")
        assert store.claim("aaaa00000001", "elsewhere:1") is not None
        assert store.claim("aaaa00000001", me, stale_seconds=60) is None
        assert store.cell_state(store.runs()[0], stale_seconds=60) == "running"
        store.connection.execute("UPDATE runs SET heartbeat = ?", (time.time() - 120,))
        assert store.cell_state(store.runs()[0], stale_seconds=60) == "left"
        last = store.claim("aaaa00000001", me, stale_seconds=60)
        assert last is not None
        store.beat("aaaa00000001", me)
        assert time.time() - store.runs()[0]["heartbeat"] < 5

        store.record_training("aaaa00000001", {"val_pretext_accuracy": 71.5, "steps": 40}, 12.0)
        store.end_attempt("aaaa00000001", last, "finished")
        run = store.runs()[0]
        assert (run["status"], run["pretext_val_accuracy_percent"], run["steps"], run["train_seconds"]) == ("finished", 71.5, 40, 12.0)
        assert store.cell_state(run) == "done"
        assert store.claim("aaaa00000001", me) is None  # finished cells are not taken again...
        # ...unless the study file plans a new probe for them: then the cell has work left.
        store.register_run("aaaa00000001", task="rotation", network="resnet50v2(-)", width=2, representation_size=None,
                           config={}, run_dir="/runs/a", plan=[("fm", "pre_logits", "mlp", "all")])
        assert store.runs()[0]["status"] == "pending" and store.claim("aaaa00000001", me) is not None


WRITER = r"""
import sys, time
from pathlib import Path
from pretextlab.study.store import ResultsStore
path, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
(go.parent / f"ready-{name}").touch()
while not go.exists():
    time.sleep(0.01)
other = "b" if name == "a" else "a"
with ResultsStore(path) as store:
    for i in range(400):
        own = {"output": f"{name}-{i}", "probe": "lbfgs", "labels": "all", "val_top1": i / 400, "test_top1": i / 400}
        store.add_probe_result("aaaa00000001", "fm", own)
        # After its first row, each waits for the other's: from then on both are writing at once.
        while i == 0 and not any(r["output"] == f"{other}-0" for r in store.probes()):
            time.sleep(0.005)
        # Both writers also write the same 30 shared rows: each must end up there exactly once.
        if i < 30:
            store.add_probe_result("aaaa00000001", "fm", {"output": f"shared-{i}", "probe": "mlp", "labels": "all"})
        store.add_curve_points("aaaa00000001", [{"step": i, "epoch": i / 10, f"{name}_loss": 1.0 / (i + 1)}])
        store.beat("aaaa00000001", "x")
print("done")
"""


def store_rows(path):
    with ResultsStore(path) as store:
        return store.probes()


def test_two_workers_writing_at_once_lose_nothing(tmp_path):
    # Fresh interpreters, not forks of this one: the writers import the store alone (no torch, ~0.05 s).
    path = tmp_path / "results.sqlite"
    _store_with_run(path).close()
    go = tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
    while not all((tmp_path / f"ready-{name}").exists() for name in "ab"):  # both at the starting line
        assert time.monotonic() < deadline and all(worker.poll() is None for worker in workers)
        time.sleep(0.01)
    go.write_text("go")
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0 and stdout.strip() == "done", stderr
    with ResultsStore(path) as store:
        outputs = [r["output"] for r in store.probes()]
        curves = store.curves()
    assert len(outputs) == len(set(outputs)) == 2 * 400 + 30
    assert {f"{n}-{i}" for n in "ab" for i in range(400)} <= set(outputs)
    assert len(curves) == 2 * 400 and {c["name"] for c in curves} == {"a_loss", "b_loss"}
    # They did write at the same time: both first rows were committed before either last row.
    ids = {r["output"]: r["id"] for r in store_rows(path)}
    assert max(ids["a-0"], ids["b-0"]) < min(ids["a-399"], ids["b-399"])



def test_cells_dropped_from_the_study_are_forgotten_if_never_started_else_marked(tmp_path):
    with _store_with_run(tmp_path / "results.sqlite") as store:
        for config_hash in ("bbbb00000002", "cccc00000003"):
            store.register_run(config_hash, task="exemplar", network="vgg19bn", width=8, representation_size=None,
                               config={}, run_dir="/runs/x", plan=[("fm", "fc6", "lbfgs", "all")])
        store.claim("bbbb00000002", worker_id())
        # Only aaaa... is still in the study file: cccc... never started and goes; bbbb... started and stays.
        assert store.retire(["aaaa00000001"]) == ["cccc00000003"]
        assert sorted((r["config_hash"], r["in_study"]) for r in store.runs()) == [("aaaa00000001", 1), ("bbbb00000002", 0)]
        assert {p["config_hash"] for p in store.planned()} == {"aaaa00000001", "bbbb00000002"}


def test_csv_export_and_locating_the_store(tmp_path):
    path = tmp_path / "results.sqlite"
    with _store_with_run(path) as store:
        store.add_probe_result("aaaa00000001", "fm", _record(test=0.625))
        store.record_training("aaaa00000001", {"val_pretext_accuracy": 80.0, "steps": 10}, None)
        rows = list(csv.DictReader(io.StringIO(store.probes_csv())))
    assert len(rows) == 1
    assert rows[0]["network"] == "resnet50v2(-)" and float(rows[0]["test_top1_percent"]) == 62.5
    assert float(rows[0]["pretext_val_accuracy_percent"]) == 80.0
    assert float(rows[0]["chosen_l2"]) == 0.01 and rows[0]["chosen_json"] == '{"l2": 0.01}'
    assert locate_store(tmp_path) == path and locate_store(path) == path
    with pytest.raises(PretextlabError, match="run `pretextlab study FILE` first"):
        locate_store(tmp_path / "nowhere")
    with pytest.raises(PretextlabError, match="no results store"):
        ResultsStore(tmp_path / "missing.sqlite", create=False)


def test_results_cli_lists_and_exports(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    with _store_with_run(path) as store:
        store.add_probe_result("aaaa00000001", "fm", _record(val=0.5, test=0.4))
    assert main(["results", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "aaaa00000001 rotation" in listed and "50.00  40.00" in listed
    # What the probe chose, as a person writes it, not a Python dict.
    assert "50.00  40.00  L2=1e-02" in listed and "{'l2'" not in listed
    target = tmp_path / "out.csv"
    assert main(["results", str(path), "--csv", str(target)]) == 0
    assert "wrote 1 probe results" in capsys.readouterr().err
    assert target.read_text().splitlines()[0].startswith("config_hash,task,network")
    assert main(["results", str(tmp_path / "nowhere")]) == 2
    assert "run `pretextlab study FILE` first" in capsys.readouterr().err
