"""Where a study's cells run: one after another in this process (inline), or as parallel jobs through
submitit's local or Slurm executor."""

from __future__ import annotations

import socket
from typing import Any, Callable

from tqdm.auto import tqdm

from pretextlab.errors import PretextlabError
from pretextlab.study.cell import run_cell, run_cell_job
from pretextlab.study.grid import Cell
from pretextlab.study.model import Study

SUBMITIT_DIR = "submitit"
# A local job runs until it finishes unless the study file sets a limit (submitit's default is 2 minutes).
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def _make_executor(study: Study, kind: str) -> Any:
    try:
        import submitit
    except ImportError as error:
        raise PretextlabError("the local and slurm executors need submitit: pip install submitit (or use --executor inline)") from error
    folder = study.directory / SUBMITIT_DIR / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as error:  # e.g. no srun: not on a Slurm cluster
        raise PretextlabError(f"cannot use the {kind} executor here ({error}): run on the cluster's login node, or use --executor inline or local") from error
    parameters = {"name": f"pretextlab-{study.name}", **study.executor.parameters}
    if kind == "local":
        parameters.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError) as error:
        raise PretextlabError(f"executor.parameters {parameters} are not valid for submitit's {kind} executor: {error}") from error
    return executor


def run_inline(study: Study, cells: list[Cell], progress: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Each cell in turn, here; returns (config hash -> finished / skipped / failed, config hash -> error)."""
    from pretextlab.training import Preempted

    ran: dict[str, str] = {}
    errors: dict[str, str] = {}
    bar = tqdm(cells, desc=f"study {study.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.label)
        try:
            ran[cell.config_hash] = run_cell(study, cell, progress=progress)
        except Preempted:
            raise  # SIGTERM to the study itself: stop here, the next run resumes this cell
        except Exception as error:
            # One broken cell should not stop the rest of the grid; its message is in the store.
            ran[cell.config_hash] = "failed"
            errors[cell.config_hash] = f"{cell.label}: {error}"
            bar.write(f"cell {cell.label} ({cell.config_hash}) failed: {error}")
    return ran, errors


def run_submitit(
    study: Study, kind: str, cells: list[Cell], *, wait: bool, progress: bool, echo: Callable[[str], None]
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """One submitit job per cell (a job array); waits for them unless ``wait`` is False.
    Returns (config hash -> outcome, config hash -> error, job ids)."""
    submitter = _make_executor(study, kind)
    if study.path is None:
        raise PretextlabError("a study run on an executor needs a study file the jobs can read: use load_study(path)")
    jobs = submitter.map_array(
        run_cell_job, [str(study.path)] * len(cells), [str(study.directory)] * len(cells), [c.config_hash for c in cells]
    )
    job_ids = [job.job_id for job in jobs]
    echo(f"submitted {len(jobs)} job(s) to the {kind} executor on {socket.gethostname()}: {', '.join(job_ids)}")
    ran: dict[str, str] = {}
    errors: dict[str, str] = {}
    if not wait:
        return ran, errors, job_ids
    for cell, job in tqdm(list(zip(cells, jobs)), desc=f"study {study.name}", unit="cell", disable=not progress):
        try:
            ran[cell.config_hash] = job.result()
        except Exception as error:  # submitit re-raises the job's failure here, with its log paths
            ran[cell.config_hash] = "failed"
            text = str(error).strip()
            errors[cell.config_hash] = f"{cell.label}: {text.splitlines()[-1] if text else repr(error)}"
    return ran, errors, job_ids
