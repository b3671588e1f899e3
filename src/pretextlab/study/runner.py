"""Running a study: show what is done / running / left, then hand what is left to an executor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pretextlab.study.checks import _choices
from pretextlab.study.executors import format_job_shape, job_shape, run_inline, run_submitit
from pretextlab.study.grid import expand_cells
from pretextlab.study.model import EXECUTORS, Study
from pretextlab.study.status import CellStatus, format_status, register, study_status
from pretextlab.study.store import ResultsStore


@dataclass
class StudyOutcome:
    statuses: list[CellStatus]
    ran: dict[str, str]  # config hash -> finished / skipped / failed
    errors: dict[str, str]
    job_ids: list[str] = field(default_factory=list)
    jobs: dict[str, Any] | None = None  # local/slurm: what the jobs ask for (executors.job_shape)

    @property
    def ok(self) -> bool:
        return not self.errors


def run_study(
    study: Study,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    wait: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> StudyOutcome:
    """Show what is done / running / left, then run what is left (unless ``dry_run``).

    A dry run only reads: it creates no study directory and no store, and writes nothing into an
    existing store (the cells are registered when the study really starts).
    """
    kind = executor or study.executor.kind
    _choices([kind], EXECUTORS, "executor", "--executor")
    cells = expand_cells(study)
    if dry_run:
        if study.store_path.exists():
            with ResultsStore(study.store_path, read_only=True) as store:
                statuses = study_status(study, store, cells)
        else:
            statuses = study_status(study, None, cells)
    else:
        with ResultsStore(study.store_path) as store:
            register(study, store, cells)
            statuses = study_status(study, store, cells)
    started = "" if study.store_path.exists() else "; not started yet"
    echo(f"study {study.name}: {study.directory} (store {study.store_path.name}{started})")
    echo(format_status(statuses))
    left = [s.cell for s in statuses if s.state == "left"]
    outcome = StudyOutcome(statuses=statuses, ran={}, errors={})
    if kind != "inline":
        outcome.jobs = job_shape(study, kind, len(left))
        if dry_run:
            echo(f"would submit {format_job_shape(outcome.jobs)}")
    if dry_run or not left:
        return outcome

    if kind == "inline":
        outcome.ran, outcome.errors = run_inline(study, left, progress)
    else:
        outcome.ran, outcome.errors, outcome.job_ids = run_submitit(study, kind, left, wait=wait, progress=progress, echo=echo)
        if not wait:
            return outcome
    with ResultsStore(study.store_path) as store:
        outcome.statuses = study_status(study, store, cells)
    echo(format_status(outcome.statuses))
    for message in outcome.errors.values():
        echo(f"failed: {message}")
    return outcome
