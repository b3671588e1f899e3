"""One cell's work: claim it in the store, train (or resume) its pretext run, fit its missing probes,
with a heartbeat while it runs; on one process or on every rank of a multi-rank job (training and
L-BFGS probes data-parallel over the ranks, the store and other probes on rank 0)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pretextlab.errors import PretextlabError
from pretextlab.study.grid import Cell, expand_cells, probe_eval_config
from pretextlab.study.model import LabelBudget, SgdSettings, Study
from pretextlab.study.schema import HEARTBEAT_SECONDS, load_study
from pretextlab.study.store import ResultsStore, worker_id

# torchrun's env:// rendezvous variables (a multi-rank cell's job sets them, cell_job.job_ranks).
TORCH_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


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


def _train_cell(study: Study, cell: Cell, trained: bool, store: ResultsStore | None, attempt: int, progress: bool) -> tuple[dict[str, Any] | None, float | None]:
    """Train (or resume) the cell's pretext run on every rank unless it has finished; returns its
    summary and training seconds (rank 0; None elsewhere or when nothing trained)."""
    from pretextlab.training import Trainer

    if trained:
        return _finished_summary(cell), None
    # resume=True continues from the checkpoint when there is one and starts afresh otherwise.
    # A stopped cell is continued by its study (or its requeued job), not by `train --resume`.
    hint = f"run `pretextlab study {study.path or 'FILE'}` again to continue it (a requeued job continues by itself)"
    trainer = Trainer(cell.config, cell.run_dir, resume=True, progress=progress, resume_hint=hint)
    if store is not None:
        store.set_attempt_start_step(attempt, trainer.step)
    started = time.perf_counter()
    summary = trainer.fit()
    return summary, time.perf_counter() - started


# A group of planned probes fitted by one evaluate_run call: (dataset, probe, stored probe, labels,
# L2 grid, SGD settings) and the outputs.
ProbeKey = tuple[str, str, str, LabelBudget, tuple[float, ...] | None, SgdSettings | None]
ProbeGroup = tuple[ProbeKey, list[str]]


def _probe_plan(cell: Cell, store: ResultsStore) -> list[ProbeGroup]:
    """The cell's missing probes, one group per evaluate_run call (rank 0 reads the store; a
    multi-rank job shares this list, so every rank makes the same calls in the same order)."""
    # Done means a result of the job's own recipe: one of an edited recipe is probed again.
    done = store.probe_recipes(cell.config_hash)
    groups: dict[ProbeKey, list[str]] = {}
    for job in cell.plan:
        if not job.done_in(done):
            groups.setdefault((job.dataset, job.probe, job.stored_probe, job.labels, job.l2_grid, job.sgd), []).append(job.output)
    return list(groups.items())


def _probe_cell(study: Study, cell: Cell, groups: list[ProbeGroup], store: ResultsStore | None, progress: bool, ranks: JobRanks) -> None:
    """Fit ``groups``: on every rank of an initialised group (L-BFGS only: evaluate_run shards it),
    or on one process; rank 0 (``store``) records each result."""
    from pretextlab.evaluate.probe_run import evaluate_run

    for (dataset_name, probe, stored_probe, labels, l2_grid, sgd), outputs in groups:
        eval_config = probe_eval_config(study, dataset_name, probe, labels, l2_grid, sgd, tuple(outputs))
        started = time.perf_counter()
        # One call per (dataset, probe, labels): the features of all its outputs come from one
        # pass over the images (cached in the run directory), and its results are stored at once.
        records = evaluate_run(cell.run_dir, eval_config, progress=progress)

        def record_results() -> None:
            assert store is not None
            for record in records:
                # Stored under the plan's key: a non-default SGD preset is a probe of its own (ProbeJob.preset).
                store.add_probe_result(cell.config_hash, dataset_name, dict(record, labels=labels.tag, probe=stored_probe))
            store.add_probe_seconds(cell.config_hash, time.perf_counter() - started)

        _from_rank0(record_results, ranks)


@dataclass(frozen=True)
class JobRanks:
    """This process's place in the job running a cell: its rank of ``world_size`` processes, the
    nodes and hosts the job spans, the cluster job ('slurm:123_4'; None for an inline cell)."""

    rank: int = 0
    world_size: int = 1
    nodes: int = 1
    hosts: str = ""
    job: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _join_group(cell: Cell, ranks: JobRanks) -> None:
    """Several ranks: the process group the trainer uses (torchrun's env:// variables, set by the job)."""
    if ranks.world_size > 1:
        from pretextlab.devices import resolve_device
        from pretextlab.training.distributed import distributed_context

        distributed_context(resolve_device(cell.config.device).type)


def _share(value: Any, ranks: JobRanks) -> Any:
    """Rank 0's ``value`` on every rank: rank 0 alone talks to the store, the others follow its decision."""
    if ranks.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _RankZeroFailed(Exception):
    """Rank 0 failed in its own part of the cell's work (it records and reports the error)."""


def _from_rank0(work: Callable[[], Any], ranks: JobRanks) -> Any:
    """``work()`` on rank 0 (the store's side of the cell), its value on every rank. A failure there
    is re-raised on rank 0 and told to the others (they raise _RankZeroFailed), so none waits for
    rank 0 in the next collective until the group's timeout."""
    if ranks.world_size == 1:
        return work()
    if not ranks.is_main:
        ok, value = _share(None, ranks)
        if not ok:
            raise _RankZeroFailed()
        return value
    try:
        value = work()
    except BaseException:
        with contextlib.suppress(Exception):  # rank 0's own error is the one to report
            _share((False, None), ranks)
        raise
    return _share((True, value), ranks)[1]


def _leave_group(ranks: JobRanks, together: bool = True) -> None:
    """After the data-parallel work the ranks part: the group goes, and with it torchrun's variables,
    so evaluate (which joins a group when WORLD_SIZE > 1) runs as one process on rank 0. Without
    ``together`` (rank 0 failed and will not reach a barrier) a rank leaves alone: a process that
    exits with its gloo group alive can abort ('terminate called without an active exception')."""
    if ranks.world_size == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    for name in TORCH_RENDEZVOUS:
        os.environ.pop(name, None)


def run_cell(study: Study, cell: Cell, progress: bool = True, ranks: JobRanks | None = None) -> str:
    """Train (or resume) one cell and fit its missing probes; returns finished, skipped or failed.

    A cell another live worker holds, or one already finished, is skipped. An exception from the
    cell's own work marks it failed (the message is kept in the store) and is re-raised; an
    interruption (Ctrl-C, SIGTERM, a requeue's exit) marks it interrupted, so the next run resumes it.

    With ``ranks`` of a multi-rank job, every rank calls this: they train as one DDP run (the same
    path as torchrun: global batch, lr scaling, SyncBN option, rank-0 writes); rank 0 alone claims,
    beats and records, so the store holds the cell once, with its ranks and nodes. Then every rank
    fits the L-BFGS probes of rank 0's plan together (evaluate_run shards the feature extraction into
    the one cache and the fit over the group: evaluate/distributed_probe.py), rank 0 storing each
    result; the others then leave (returning "trained") and rank 0 alone fits the SGD/MLP probes,
    which run in one process. A failure in rank 0's store work stops the other ranks too (they return
    "failed"); a rank that dies in a collective ends its Slurm job (srun --kill-on-bad-exit, executors.py).
    """
    from pretextlab.training import Preempted

    ranks = ranks or JobRanks(hosts=socket.gethostname())
    _join_group(cell, ranks)
    owner = worker_id(ranks.job)
    store = ResultsStore(study.store_path) if ranks.is_main else None
    try:
        def claim() -> tuple[int | None, bool]:
            assert store is not None
            attempt = store.claim(cell.config_hash, owner, study.runtime.stale_seconds,
                                  ranks=ranks.world_size, nodes=ranks.nodes, hosts=ranks.hosts)
            return attempt, _finished_summary(cell) is not None

        try:
            attempt, trained = _from_rank0(claim, ranks)
        except _RankZeroFailed:
            _leave_group(ranks, together=False)
            return "failed"
        if attempt is None:
            _leave_group(ranks)
            return "skipped"
        try:
            with _Heartbeat(study.store_path, cell.config_hash, owner) if store else contextlib.nullcontext():
                summary, seconds = _train_cell(study, cell, trained, store, attempt, progress)

                def record_training() -> list[ProbeGroup]:
                    from pretextlab.training import read_metrics

                    assert store is not None
                    store.record_training(cell.config_hash, summary, seconds)
                    store.add_curve_points(cell.config_hash, read_metrics(cell.run_dir))
                    return _probe_plan(cell, store)

                # Rank 0's plan on every rank (and, as a broadcast after its last write, the checkpoint
                # is whole before any rank loads it to probe).
                plan = _from_rank0(record_training, ranks)
                # L-BFGS is data-parallel (probe_run.process_shard); SGD and MLP probes run in one process.
                sharded = [ranks.world_size > 1 and key[1] == "lbfgs" for key, _ in plan]
                _probe_cell(study, cell, [g for g, s in zip(plan, sharded) if s], store, progress, ranks)
                _leave_group(ranks)
                if store is None:
                    return "trained"
                _probe_cell(study, cell, [g for g, s in zip(plan, sharded) if not s], store, progress, JobRanks())
        except _RankZeroFailed:
            _leave_group(ranks, together=False)
            return "failed"  # rank 0 records and reports its error
        except (KeyboardInterrupt, SystemExit, Preempted) as stop:
            if store is not None:
                why = f"the job exited (code {stop.code}): requeued or stopped by its scheduler" if isinstance(stop, SystemExit) else str(stop)
                store.end_attempt(cell.config_hash, attempt, "interrupted", error=why or type(stop).__name__)
            raise
        except BaseException as error:
            if store is not None:
                store.end_attempt(cell.config_hash, attempt, "failed", error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")
            raise
        assert store is not None
        store.end_attempt(cell.config_hash, attempt, "finished")
        return "finished"
    finally:
        if store is not None:
            store.close()


def run_cell_job(study_file: str, out: str, config_hash: str, ranks: JobRanks | None = None) -> str:
    """A cluster job's work: re-read the study file and run one of its cells (on this rank)."""
    study = load_study(study_file, out=out)
    cells = {cell.config_hash: cell for cell in expand_cells(study)}
    if config_hash not in cells:
        raise PretextlabError(f"{study_file} has no cell {config_hash} any more: the study file changed after submission")
    return run_cell(study, cells[config_hash], progress=False, ranks=ranks)
