"""Where a study's cells run: one after another in this process (inline), or as parallel jobs through
submitit's local or Slurm executor."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from pretextlab.errors import PretextlabError
from pretextlab.study.cell import run_cell
from pretextlab.study.cell_job import CellJob, slurm_state
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
    # submitit logs to stdout as well as stderr; this command's stdout is its one JSON document.
    submitit_logger = logging.getLogger("submitit")
    for handler in [h for h in submitit_logger.handlers if h.name == "submitit_out"]:
        submitit_logger.removeHandler(handler)
    folder = study.directory / SUBMITIT_DIR / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as error:  # e.g. no srun: not on a Slurm cluster
        raise PretextlabError(f"cannot use the {kind} executor here ({error}): run on the cluster's login node, or use --executor inline or local") from error
    parameters = {"name": f"pretextlab-{study.name}", **study.executor.parameters}
    if kind == "local":
        parameters.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
    if kind == "slurm":
        # A rank that fails ends its job's other ranks (which would wait for it in a collective until
        # the time limit); a rank that stops for a requeue exits 0 so it cannot end rank 0 first.
        parameters.setdefault("slurm_srun_args", ["--kill-on-bad-exit=1"])
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError) as error:
        raise PretextlabError(f"executor.parameters {parameters} are not valid for submitit's {kind} executor: {error}") from error
    return executor


def job_shape(study: Study, kind: str, cells: int) -> dict[str, Any]:
    """What ``cells`` jobs on the ``kind`` executor would ask for, from executor.parameters:
    nodes x tasks_per_node ranks each (one DDP rank per task), GPUs per node, time limit in minutes."""
    p = study.executor.parameters
    nodes, tasks = int(p.get("nodes", 1)), int(p.get("tasks_per_node", 1))
    timeout = p.get("timeout_min", p.get("slurm_time", LOCAL_TIMEOUT_MIN if kind == "local" else None))
    at_once = min(cells, int(p.get("slurm_array_parallelism", cells)))
    return {
        "executor": kind, "jobs": cells, "nodes": nodes, "tasks_per_node": tasks, "ranks_per_job": nodes * tasks,
        "gpus_per_node": int(p.get("gpus_per_node", 0)), "timeout_min": timeout, "partition": p.get("slurm_partition"),
        "jobs_at_once": at_once, "gpus_at_once": at_once * nodes * int(p.get("gpus_per_node", 0)),
    }


def format_job_shape(shape: dict[str, Any]) -> str:
    """One line for people: how many jobs, each of how many nodes, tasks (DDP ranks) and GPUs, how
    many at once (slurm_array_parallelism), for how long."""
    time_limit = "submitit's default time limit" if shape["timeout_min"] is None else f"time limit {shape['timeout_min']} min"
    where = f" on partition {shape['partition']}" if shape["partition"] else ""
    return (
        f"{shape['jobs']} {shape['executor']} job(s){where}, each {shape['nodes']} node(s) x {shape['tasks_per_node']} "
        f"task(s) ({shape['ranks_per_job']} DDP rank(s)), {shape['gpus_per_node']} GPU(s) per node "
        f"({shape['jobs_at_once']} job(s) at once: {shape['gpus_at_once']} GPUs), {time_limit}"
    )


# Slurm job states after which no task will write a result any more (a requeued job is PENDING again).
SLURM_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")
# Seconds a job may have ended before its result files show (a shared file system's delay): a
# completed job has written one; a failed or cancelled one only if its function raised.
RESULT_GRACE_SECONDS = {"COMPLETED": 30.0}
OTHER_GRACE_SECONDS = 5.0


def _wait(job: Any, kind: str) -> str | None:
    """Wait for ``job``'s results; returns the Slurm state it ended in when it ended without them
    (killed outright, node failure), which submitit alone would wait for forever without sacct."""
    ended_at = None
    while not job.done():
        state = slurm_state(job.job_id) if kind == "slurm" else None
        if state in SLURM_ENDED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_SECONDS.get(state, OTHER_GRACE_SECONDS):
                return state
        else:
            ended_at = None
        time.sleep(1)
    return None


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
    echo(f"submitting {format_job_shape(job_shape(study, kind, len(cells)))}")
    jobs = submitter.map_array(
        CellJob(), [str(study.path)] * len(cells), [str(study.directory)] * len(cells), [c.config_hash for c in cells]
    )
    job_ids = [job.job_id for job in jobs]
    echo(f"submitted {len(jobs)} job(s) to the {kind} executor on {socket.gethostname()}: {', '.join(job_ids)}")
    ran: dict[str, str] = {}
    errors: dict[str, str] = {}
    if not wait:
        return ran, errors, job_ids
    for cell, job in tqdm(list(zip(cells, jobs)), desc=f"study {study.name}", unit="cell", disable=not progress):
        ended = _wait(job, kind)
        if ended:
            ran[cell.config_hash] = "failed"
            errors[cell.config_hash] = (
                f"{cell.label}: job {job.job_id} ended {ended} without a result (killed?); its logs are in {job.paths.folder}. "
                "Run `pretextlab study FILE` again: the cell resumes from its checkpoint"
            )
            continue
        try:
            # Every rank of a multi-task job returns; rank 0's outcome is the cell's.
            ran[cell.config_hash] = job.results()[0]
        except Exception as error:  # submitit re-raises the job's failure here, with its log paths
            ran[cell.config_hash] = "failed"
            text = str(error).strip()
            errors[cell.config_hash] = f"{cell.label}: {text.splitlines()[-1] if text else repr(error)}"
    return ran, errors, job_ids
