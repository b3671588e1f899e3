"""One cell's work: claim it in the store, train (or resume) its pretext run, fit its missing probes,
with a heartbeat while it runs; also the entry point of a cluster job."""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pretextlab.errors import PretextlabError
from pretextlab.study.grid import Cell, expand_cells, probe_eval_config
from pretextlab.study.model import LabelBudget, SgdSettings, Study
from pretextlab.study.schema import HEARTBEAT_SECONDS, load_study
from pretextlab.study.store import ResultsStore, worker_id


class _Heartbeat:
    """Refreshes the cell's heartbeat from a background thread (its own connection) while it runs."""

    def __init__(self, store_path: Path, config_hash: str, owner: str, period: float = HEARTBEAT_SECONDS) -> None:
        self.store_path, self.config_hash, self.owner, self.period = store_path, config_hash, owner, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{config_hash}", daemon=True)

    def _run(self) -> None:
        store = ResultsStore(self.store_path)
        try:
            while not self.stop.wait(self.period):
                store.beat(self.config_hash, self.owner)
        finally:
            store.close()

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _finished_summary(cell: Cell) -> dict[str, Any] | None:
    from pretextlab.training import SUMMARY_FILE

    path = cell.run_dir / SUMMARY_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("config_hash") == cell.config_hash else None


def _train_cell(cell: Cell, store: ResultsStore, attempt: int, progress: bool) -> None:
    from pretextlab.training import Trainer, read_metrics

    summary = _finished_summary(cell)
    seconds = None
    if summary is None:
        # resume=True continues from the checkpoint when there is one and starts afresh otherwise.
        trainer = Trainer(cell.config, cell.run_dir, resume=True, progress=progress)
        store.set_attempt_start_step(attempt, trainer.step)
        started = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - started
    store.record_training(cell.config_hash, summary, seconds)
    store.add_curve_points(cell.config_hash, read_metrics(cell.run_dir))


def _probe_cell(study: Study, cell: Cell, store: ResultsStore, progress: bool) -> None:
    from pretextlab.evaluate.probe_run import evaluate_run

    # Done means a result of the job's own recipe: one of an edited recipe is probed again.
    done = store.probe_recipes(cell.config_hash)
    groups: dict[tuple[str, str, str, LabelBudget, tuple[float, ...] | None, SgdSettings | None], list[str]] = {}
    for job in cell.plan:
        if not job.done_in(done):
            groups.setdefault((job.dataset, job.probe, job.stored_probe, job.labels, job.l2_grid, job.sgd), []).append(job.output)
    for (dataset_name, probe, stored_probe, labels, l2_grid, sgd), outputs in groups.items():
        eval_config = probe_eval_config(study, dataset_name, probe, labels, l2_grid, sgd, tuple(outputs))
        started = time.perf_counter()
        # One call per (dataset, probe, labels): the features of all its outputs come from one
        # pass over the images (cached in the run directory), and its results are stored at once.
        records = evaluate_run(cell.run_dir, eval_config, progress=progress)
        for record in records:
            # Stored under the plan's key: a non-default SGD preset is a probe of its own (ProbeJob.preset).
            record = dict(record, labels=labels.tag, probe=stored_probe)
            store.add_probe_result(cell.config_hash, dataset_name, record)
        store.add_probe_seconds(cell.config_hash, time.perf_counter() - started)


def run_cell(study: Study, cell: Cell, progress: bool = True) -> str:
    """Train (or resume) one cell and fit its missing probes; returns finished, skipped or failed.

    A cell another live worker holds, or one already finished, is skipped. An exception from the
    cell's own work marks it failed (the message is kept in the store) and is re-raised; an
    interruption (Ctrl-C, SIGTERM) marks it interrupted, so the next run resumes it.
    """
    from pretextlab.training import Preempted

    owner = worker_id()
    with ResultsStore(study.store_path) as store:
        attempt = store.claim(cell.config_hash, owner, study.runtime.stale_seconds)
        if attempt is None:
            return "skipped"
        try:
            with _Heartbeat(study.store_path, cell.config_hash, owner):
                _train_cell(cell, store, attempt, progress)
                _probe_cell(study, cell, store, progress)
        except (KeyboardInterrupt, Preempted) as stop:
            store.end_attempt(cell.config_hash, attempt, "interrupted", error=str(stop) or type(stop).__name__)
            raise
        except BaseException as error:
            store.end_attempt(cell.config_hash, attempt, "failed", error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")
            raise
        store.end_attempt(cell.config_hash, attempt, "finished")
        return "finished"


def run_cell_job(study_file: str, out: str, config_hash: str) -> str:
    """A cluster job's entry point: re-read the study file and run one of its cells."""
    study = load_study(study_file, out=out)
    cells = {cell.config_hash: cell for cell in expand_cells(study)}
    if config_hash not in cells:
        raise PretextlabError(f"{study_file} has no cell {config_hash} any more: the study file changed after submission")
    return run_cell(study, cells[config_hash], progress=False)
