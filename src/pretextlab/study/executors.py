"""Where a study's cells run: one after another in this process (inline), or as parallel jobs through
submitit's local or Slurm executor."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import time
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from pretextlab.errors import PretextlabError
from pretextlab.study.cell import run_cell
from pretextlab.study.cell_job import CellJob
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


def _array_tasks(spec: str) -> list[str]:
    """The task indices of scontrol's ArrayTaskId: "3", "2-5", "1,4-9:2", "2-7%2" (at most 2 at once)."""
    tasks: list[str] = []
    for part in spec.partition("%")[0].strip("[]").split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        tasks.extend(str(i) for i in range(int(first), int(last or first) + 1, int(step or 1)))
    return tasks


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """The states of ``job_ids`` (submitit's ids: ARRAY_TASK or JOB) from slurmctld, with one
    `scontrol show job` per job array, not one per job; a job slurmctld no longer knows or cannot
    be asked about is left out."""
    states: dict[str, str] = {}
    for array in sorted({job_id.partition("_")[0] for job_id in job_ids}):
        try:
            shown = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if shown.returncode != 0:
            continue
        for line in shown.stdout.splitlines():
            fields = dict(re.findall(r"\b(JobId|ArrayJobId|ArrayTaskId|JobState)=(\S+)", line))
            if "JobState" not in fields:
                continue
            if "ArrayTaskId" in fields:  # a pending rest of the array is one line: ArrayTaskId=2-7
                for task in _array_tasks(fields["ArrayTaskId"]):
                    states[f"{fields['ArrayJobId']}_{task}"] = fields["JobState"]
            else:
                states[fields["JobId"]] = fields["JobState"]
    return {job_id: states[job_id] for job_id in job_ids if job_id in states}


def _wait(jobs: list[Any], kind: str) -> Iterator[tuple[int, str | None]]:
    """Yields (index, None) as each job's results are there, or (index, the Slurm state it ended in)
    when it ended without them (killed outright, node failure), which submitit alone would wait for
    forever without sacct. All jobs are watched together, so a dead job is noticed within its grace
    period of ending however long the jobs before it in the list still run."""
    waiting = dict(enumerate(jobs))
    ended_at: dict[int, float] = {}
    while waiting:
        states = slurm_states([job.job_id for job in waiting.values()]) if kind == "slurm" else {}
        now = time.monotonic()
        for index, job in list(waiting.items()):
            state = states.get(job.job_id)
            if job.done():
                state = None
            elif state in SLURM_ENDED:
                if now - ended_at.setdefault(index, now) <= RESULT_GRACE_SECONDS.get(state, OTHER_GRACE_SECONDS):
                    continue
            else:
                ended_at.pop(index, None)  # requeued: PENDING again
                continue
            del waiting[index]
            yield index, state
        if waiting:
            time.sleep(1)


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
    bar = tqdm(total=len(jobs), desc=f"study {study.name}", unit="cell", disable=not progress)
    for index, ended in _wait(jobs, kind):
        cell, job = cells[index], jobs[index]
        bar.update()
        if ended:
            ran[cell.config_hash] = "failed"
            errors[cell.config_hash] = (
                f"{cell.label}: job {job.job_id} ended {ended} without a result (killed?); its logs are in {job.paths.folder}. "
                "Run `pretextlab study FILE` again: the cell resumes from its checkpoint"
            )
        else:
            try:
                # Every rank of a multi-task job returns; rank 0's outcome is the cell's.
                ran[cell.config_hash] = job.results()[0]
            except Exception as error:  # submitit re-raises the job's failure here, with its log paths
                ran[cell.config_hash] = "failed"
                text = str(error).strip()
                errors[cell.config_hash] = f"{cell.label}: {text.splitlines()[-1] if text else repr(error)}"
        if cell.config_hash in errors:
            # Now, while the other jobs still run: with many cells the end of the study can be far off.
            with bar.external_write_mode():
                echo(f"failed: {errors[cell.config_hash]}")
    bar.close()
    # In the cells' order, not the order the jobs ended in.
    order = [cell.config_hash for cell in cells]
    return {h: ran[h] for h in order}, {h: errors[h] for h in order if h in errors}, job_ids
