"""The results store of a study: one SQLite file (standard library), WAL mode, safe for parallel workers.

Tables::

    meta      key -> value: the study's name, its study file's text, the store's format version
              (``schema_version``) and the pretextlab version that last wrote the format
    runs      one row per cell of the grid (keyed by the pretext config's hash): its config, status
              (pending / running / finished / failed / interrupted), the worker holding it and its
              heartbeat, pretext metrics and timings (``trained`` is when its pretext run ended);
              ``ranks``, ``nodes``, ``hosts``: the job shape of its latest attempt (a DDP cell: N ranks)
              ``in_study`` is 0 for a cell the study file no longer names (kept for its results)
    attempts  one row per time a worker took a cell: when, who, from which step, how it ended, on
              how many ranks and nodes
    plan      the probe results a cell is expected to produce (dataset, output, probe, labels) and
              the probe recipe each is asked with (``recipe``: store_format.probe_recipe_id)
    probes    the current probe results: top-1 on val and test in percent, regularisation chosen,
              the full record as JSON, its recipe id; unique per (run, dataset, output, probe, labels)
    superseded_probes  results of a recipe the plan no longer asks for (an edited ``l2_grid`` or
              ``sgd`` section): kept, but not current, so not in ``probes()``, the CSV or the report
    curves    pretext training curves (metrics.jsonl), one row per (run, step, metric)

Every accuracy in the store is in percent, and its column says so (``*_percent``). Format 1 (the
first release) kept probe accuracies as fractions, formats 1 and 2 no recipe ids, formats 1 to 3 no
ranks or nodes; such a store
is upgraded in place, in one transaction, the first time a command that writes opens it (the study
running); one that only reads (``read_only``: report, results, a dry run) upgrades a private in-memory
copy and leaves the file, and everything beside it, as it was. A store of an unknown format, or a file that is
not a readable SQLite store, is refused with one line naming the file and what to do; it is never
modified.

Every write is one short transaction; ``busy_timeout`` makes a writer wait for another's lock
instead of failing, and the unique constraints make a repeated write a no-op, so several workers
(local processes or cluster jobs on a shared file system with working locks) can write at once
without losing or duplicating rows. The report is built from this file alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from pretextlab.errors import PretextlabError
from pretextlab.study.owners import owner_is_dead, same_job, worker_id
from pretextlab.study.store_format import KEY_SQL, RESULT_COLUMNS, STORE_FILE, StoreFile, make_current, probe_recipe_id

RUN_STATUSES = ("pending", "running", "finished", "failed", "interrupted")
# Seconds without a heartbeat after which a 'running' cell held by another machine counts as abandoned.
DEFAULT_STALE_SECONDS = 300.0

ProbeKey = tuple[str, str, str, str]  # (dataset, output, probe, labels)
# A planned probe: its key, or its key and the recipe id it is asked with (None: any recipe will do).
PlannedProbe = ProbeKey | tuple[str, str, str, str, str | None]

# The CSV export's columns, each accuracy named with its unit.
CSV_COLUMNS = (
    "config_hash", "task", "network", "width", "representation_size", "dataset", "output", "probe", "labels",
    "val_top1_percent", "test_top1_percent", "chosen_l2", "chosen_json", "feature_dim", "train_images", "seconds",
    "run_dir", "pretext_val_accuracy_percent",
)


def percent_field(record: dict[str, Any], name: str, old_unit: float) -> float | None:
    """``record[name + '_percent']``, else the pre-unit-suffix ``record[name]`` times ``old_unit``.

    Probe records once held fractions under ``val_top1`` / ``test_top1`` (old_unit 100); a
    summary's ``val_pretext_accuracy`` was already percent (old_unit 1). Newer records name the unit.
    """
    value = record.get(f"{name}_percent")
    if value is None:
        value = record.get(name)
        if value is not None:
            value = round(float(value) * old_unit, 10)  # 0.5625 -> 56.25, without binary noise
    return None if value is None else float(value)


def locate_store(path: str | os.PathLike) -> Path:
    """The store file for ``path``: a .sqlite file itself or a study directory (a study file is
    resolved by the study package, which knows where its directory is)."""
    path = Path(path)
    if path.is_dir():
        path = path / STORE_FILE
    if not path.exists():
        raise PretextlabError(
            f"no results store at {path}: pass a study file (.yaml), a study directory or its {STORE_FILE}, "
            "and run `pretextlab study FILE` first"
        )
    return path


class ResultsStore(StoreFile):
    """One study's SQLite store. Open one per process (or thread); every method commits at once."""

    def register_run(
        self,
        config_hash: str,
        *,
        task: str,
        network: str,
        width: int | None,
        representation_size: int | None,
        config: dict[str, Any],
        run_dir: str,
        plan: Iterable[PlannedProbe] = (),
    ) -> None:
        """Add a cell (pending) with its planned probes; an existing cell keeps its status and results,
        and its plan becomes exactly ``plan`` (the study file's evaluations may have changed).

        A current result of another recipe than its planned probe's is superseded (kept, no longer
        current), and a superseded result of the planned recipe becomes current again, so a study
        whose recipe changed back reuses what it had instead of probing again."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (config_hash, task, network, width, representation_size, config_json, run_dir, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (config_hash, task, network, width, representation_size, json.dumps(config, sort_keys=True, default=str), run_dir, time.time()),
            )
            # The study directory may have moved since the cell was first registered.
            db.execute("UPDATE runs SET run_dir = ? WHERE config_hash = ?", (run_dir, config_hash))
            db.execute("DELETE FROM plan WHERE config_hash = ?", (config_hash,))
            rows = [(config_hash, *key, None)[:6] for key in plan]
            db.executemany(
                "INSERT OR IGNORE INTO plan (config_hash, dataset, output, probe, labels, recipe) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            for row in rows:
                if row[5] is not None:
                    make_current(db, row[:5], row[5])
            # A finished cell whose plan has grown (a new evaluation) or changed recipe has work left again.
            db.execute(
                "UPDATE runs SET status = 'pending' WHERE config_hash = ? AND status = 'finished' AND EXISTS ("
                "SELECT 1 FROM plan p WHERE p.config_hash = runs.config_hash AND NOT EXISTS ("
                "SELECT 1 FROM probes q WHERE q.config_hash = p.config_hash AND q.dataset = p.dataset "
                "AND q.output = p.output AND q.probe = p.probe AND q.labels = p.labels "
                "AND (p.recipe IS NULL OR q.recipe IS p.recipe)))",
                (config_hash,),
            )


    def retire(self, keep: Iterable[str]) -> list[str]:
        """The study file's grid is now ``keep``: cells outside it that never started are removed;
        those with any attempt or result stay (no finished work is ever lost) but are marked out
        of the study, so the report leaves them out of its tables. Returns the removed hashes."""
        keep = set(keep)
        with self.transaction() as db:
            for (config_hash,) in db.execute("SELECT config_hash FROM runs").fetchall():
                db.execute("UPDATE runs SET in_study = ? WHERE config_hash = ?", (int(config_hash in keep), config_hash))
            rows = db.execute(
                "SELECT config_hash FROM runs WHERE status = 'pending' AND config_hash NOT IN (SELECT config_hash FROM attempts) "
                "AND config_hash NOT IN (SELECT config_hash FROM probes) AND config_hash NOT IN (SELECT config_hash FROM superseded_probes)"
            ).fetchall()
            gone = [r[0] for r in rows if r[0] not in keep]
            for config_hash in gone:
                db.execute("DELETE FROM plan WHERE config_hash = ?", (config_hash,))
                db.execute("DELETE FROM curves WHERE config_hash = ?", (config_hash,))
                db.execute("DELETE FROM runs WHERE config_hash = ?", (config_hash,))
        return gone

    # -- claiming and status ---------------------------------------------------------------------

    def claim(
        self, config_hash: str, owner: str, stale_seconds: float = DEFAULT_STALE_SECONDS,
        *, ranks: int = 1, nodes: int = 1, hosts: str | None = None,
    ) -> int | None:
        """Take the cell for ``owner`` unless a live worker holds it; returns the attempt id, or None.
        ``ranks`` processes on ``nodes`` nodes (``hosts``) will run it: recorded on the attempt and the cell.

        A 'running' cell is free again when its heartbeat is older than ``stale_seconds``, its
        owner is a process of this machine that has died (a killed run resumes at once), or its
        owner is the same cluster job (requeued after preemption: its earlier run is gone).
        """
        hosts = hosts or socket.gethostname()
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT status, owner, heartbeat FROM runs WHERE config_hash = ?", (config_hash,)).fetchone()
            if row is None:
                raise PretextlabError(f"cell {config_hash} is not in the store {self.path}: register the study first")
            status, holder, heartbeat = row
            if status == "finished":
                return None
            if status == "running" and holder != owner:
                alive = heartbeat is not None and now - heartbeat < stale_seconds and not owner_is_dead(holder)
                alive = alive and not same_job(holder, owner)
                if alive:
                    return None
                db.execute(
                    "UPDATE attempts SET ended = ?, outcome = 'abandoned' WHERE config_hash = ? AND owner = ? AND ended IS NULL",
                    (now, config_hash, holder),
                )
            db.execute(
                "UPDATE runs SET status = 'running', owner = ?, heartbeat = ?, started = COALESCE(started, ?), error = NULL, "
                "ranks = ?, nodes = ?, hosts = ? WHERE config_hash = ?",
                (owner, now, now, ranks, nodes, hosts, config_hash),
            )
            cursor = db.execute(
                "INSERT INTO attempts (config_hash, owner, started, ranks, nodes, hosts) VALUES (?, ?, ?, ?, ?, ?)",
                (config_hash, owner, now, ranks, nodes, hosts),
            )
            return int(cursor.lastrowid)

    def beat(self, config_hash: str, owner: str) -> None:
        """Refresh the heartbeat of a cell this owner holds."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET heartbeat = ? WHERE config_hash = ? AND owner = ? AND status = 'running'",
                (time.time(), config_hash, owner),
            )

    def set_attempt_start_step(self, attempt: int, step: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE attempts SET start_step = ? WHERE id = ?", (step, attempt))

    def record_training(self, config_hash: str, summary: dict[str, Any], train_seconds: float | None) -> None:
        """The pretext run has finished: its accuracy, steps and timing."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET pretext_val_accuracy_percent = ?, steps = ?, summary_json = ?, "
                "train_seconds = COALESCE(train_seconds, 0) + COALESCE(?, 0), trained = COALESCE(trained, ?) "
                "WHERE config_hash = ?",
                (
                    percent_field(summary, "val_pretext_accuracy", old_unit=1.0),
                    summary.get("steps"),
                    json.dumps(summary, sort_keys=True, default=str),
                    train_seconds,
                    time.time(),
                    config_hash,
                ),
            )

    def add_probe_seconds(self, config_hash: str, seconds: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET probe_seconds = COALESCE(probe_seconds, 0) + ? WHERE config_hash = ?", (seconds, config_hash)
            )

    def end_attempt(self, config_hash: str, attempt: int, outcome: str, error: str | None = None) -> None:
        """Close an attempt; ``outcome`` becomes the cell's status (finished, failed, interrupted)."""
        if outcome not in RUN_STATUSES:
            raise PretextlabError(f"unknown outcome {outcome!r}: choose one of {', '.join(RUN_STATUSES)}")
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE attempts SET ended = ?, outcome = ? WHERE id = ?", (now, outcome, attempt))
            db.execute(
                "UPDATE runs SET status = ?, error = ?, heartbeat = ?, finished = CASE WHEN ? = 'finished' THEN ? ELSE finished END "
                "WHERE config_hash = ?",
                (outcome, error, now, outcome, now, config_hash),
            )

    # -- results ---------------------------------------------------------------------------------

    def add_probe_result(self, config_hash: str, dataset: str, record: dict[str, Any]) -> bool:
        """Store one probe result as current; returns False when it is not: that (run, dataset, output,
        probe, labels) already had a result of the same recipe, or its plan asks for another recipe
        (a worker that read an older study file), in which case it is kept as superseded.

        Its recipe is ``probe_recipe_id(record["probe_config"])``; a current result of another
        recipe is superseded by it. Accuracies are read as ``val_top1_percent`` /
        ``test_top1_percent``, or as the older fractions ``val_top1`` / ``test_top1``, and stored in percent."""
        for field in ("output", "probe", "labels"):
            if field not in record:
                raise PretextlabError(f"a probe record needs {field!r}; got keys {', '.join(sorted(record))}")
        recipe = probe_recipe_id(record.get("probe_config"))
        key = (config_hash, dataset, record["output"], record["probe"], record["labels"])
        with self.transaction() as db:
            planned = db.execute(f"SELECT recipe FROM plan WHERE {KEY_SQL}", key).fetchone()
            stale = planned is not None and planned[0] is not None and planned[0] != recipe
            if not stale:
                make_current(db, key, recipe)  # another recipe's current result is moved aside
            table, extra = ("superseded_probes", ", superseded") if stale else ("probes", "")
            cursor = db.execute(
                f"INSERT OR IGNORE INTO {table} ({RESULT_COLUMNS}{extra}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' if extra else ''})",
                (
                    config_hash,
                    dataset,
                    record["output"],
                    record["probe"],
                    record["labels"],
                    percent_field(record, "val_top1", old_unit=100.0),
                    percent_field(record, "test_top1", old_unit=100.0),
                    json.dumps(record.get("chosen"), sort_keys=True, default=str),
                    record.get("feature_dim"),
                    record.get("train_images"),
                    record.get("seconds"),
                    json.dumps(record, sort_keys=True, default=str),
                    time.time(),
                    recipe,
                    *((time.time(),) if extra else ()),
                ),
            )
            return table == "probes" and cursor.rowcount == 1

    def add_curve_points(self, config_hash: str, records: Iterable[dict[str, Any]]) -> int:
        """Store the numeric metrics of metrics.jsonl records; returns how many points were new."""
        points = []
        for record in records:
            if "step" not in record:
                continue
            for name, value in record.items():
                if name in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                points.append((config_hash, int(record["step"]), record.get("epoch"), name, float(value)))
        with self.transaction() as db:
            before = db.execute("SELECT COUNT(*) FROM curves WHERE config_hash = ?", (config_hash,)).fetchone()[0]
            db.executemany(
                "INSERT OR REPLACE INTO curves (config_hash, step, epoch, name, value) VALUES (?, ?, ?, ?, ?)", points
            )
            after = db.execute("SELECT COUNT(*) FROM curves WHERE config_hash = ?", (config_hash,)).fetchone()[0]
        return after - before

    # -- reading ---------------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        """Every cell, with its config and pretext summary decoded."""
        rows = self._rows("SELECT * FROM runs ORDER BY task, network, width, representation_size, config_hash")
        for row in rows:
            row["config"] = json.loads(row.pop("config_json"))
            row["summary"] = json.loads(row.pop("summary_json")) if row.get("summary_json") else None
        return rows

    def probes(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE p.config_hash = ?", (config_hash,)) if config_hash else ("", ())
        rows = self._rows(
            "SELECT p.*, r.task, r.network, r.width, r.representation_size, r.run_dir FROM probes p "
            f"JOIN runs r ON r.config_hash = p.config_hash {where} ORDER BY r.task, r.network, r.width, p.dataset, p.output, p.probe, p.labels",
            params,
        )
        for row in rows:
            row["chosen"] = json.loads(row.pop("chosen_json")) if row.get("chosen_json") else None
            row["record"] = json.loads(row.pop("record_json"))
        return rows

    def probe_keys(self, config_hash: str) -> set[ProbeKey]:
        return set(self.probe_recipes(config_hash))

    def probe_recipes(self, config_hash: str) -> dict[ProbeKey, str | None]:
        """Each current result's key -> its recipe id (None: unknown, stored before format 3)."""
        rows = self._rows("SELECT dataset, output, probe, labels, recipe FROM probes WHERE config_hash = ?", (config_hash,))
        return {(r["dataset"], r["output"], r["probe"], r["labels"]): r["recipe"] for r in rows}

    def superseded(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        """Results of recipes the plan no longer asks for, oldest first (kept; never current)."""
        return self._table("superseded_probes", "superseded, created", config_hash)

    def planned(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        return self._table("plan", "config_hash, dataset, output, probe, labels", config_hash)

    def attempts(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        return self._table("attempts", "id", config_hash)

    def curves(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        return self._table("curves", "config_hash, name, step", config_hash)

    def _table(self, table: str, order: str, config_hash: str | None) -> list[dict[str, Any]]:
        """Every row of ``table``, or one cell's, in ``order``."""
        where, params = ("WHERE config_hash = ?", (config_hash,)) if config_hash else ("", ())
        return self._rows(f"SELECT * FROM {table} {where} ORDER BY {order}", params)

    def cell_state(self, run: dict[str, Any], stale_seconds: float = DEFAULT_STALE_SECONDS) -> str:
        """done / running / left for one row of ``runs()`` (left covers pending, interrupted, failed)."""
        if run["status"] == "finished":
            return "done"
        if run["status"] == "running":
            fresh = run["heartbeat"] is not None and time.time() - run["heartbeat"] < stale_seconds
            if fresh and not owner_is_dead(run["owner"]):
                return "running"
        return "left"

    # -- export ----------------------------------------------------------------------------------

    def probes_csv(self) -> str:
        """Every probe result joined with its run, as CSV (accuracies in percent, as the columns say)."""
        pretext = {r["config_hash"]: r["pretext_val_accuracy_percent"] for r in self.runs()}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.probes():
            chosen = row["chosen"] if isinstance(row["chosen"], dict) else {}
            values = dict(
                row,
                chosen_l2=chosen.get("l2"),
                chosen_json=json.dumps(row["chosen"], sort_keys=True),
                pretext_val_accuracy_percent=pretext.get(row["config_hash"]),
            )
            writer.writerow([values.get(c) for c in CSV_COLUMNS])
        return buffer.getvalue()


