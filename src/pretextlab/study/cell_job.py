"""A study cell as a submitit job (local or Slurm): its ranks and rendezvous from submitit's job
environment, and what a preempted or timed-out job does (checkpoint, back in the queue, resume)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from typing import Any

from pretextlab.errors import PretextlabError
from pretextlab.study.cell import JobRanks, run_cell_job


def job_ranks() -> JobRanks:
    """This process's rank in its submitit job (one per task: nodes x tasks_per_node), with torch's
    env:// rendezvous exported when there are several: rank 0's host and a port drawn from the job
    id (submitit's TorchDistributedEnvironment), the same variables torchrun sets. Outside a job: one rank."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return JobRanks(hosts=socket.gethostname())
    if env.num_tasks > 1:
        # Every GPU of the node stays visible: the trainer picks cuda:LOCAL_RANK, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return JobRanks(
        rank=env.global_rank, world_size=env.num_tasks, nodes=env.num_nodes,
        hosts=",".join(env.hostnames), job=f"{env.cluster}:{env.job_id}",
    )


def slurm_state(job_id: str) -> str | None:
    """The job's state from slurmctld (scontrol works where sacct has no accounting database);
    None when slurmctld no longer knows the job or cannot be asked."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bJobState=(\w+)", shown.stdout)
    return match.group(1) if shown.returncode == 0 and match else None


def _requeue(job: str) -> None:
    """Put this Slurm job back in the queue (what submitit does after its own checkpoint signal)."""
    job_id = job.partition(":")[2]
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        raise PretextlabError(f"cannot requeue Slurm job {job_id} ({detail}): run `pretextlab study FILE` again to resume the cell") from error
    print(f"pretextlab: job {job_id} requeued; the cell resumes from its checkpoint", file=sys.stderr)


def _checkpoint_signal() -> int:
    """submitit's checkpoint signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit import JobEnvironment

    return int(JobEnvironment._usr_sig())


def _stop_training_on(signum: int) -> None:
    """While the trainer holds SIGTERM (it checkpoints after the current step and stops), ``signum``
    is handed to it as SIGTERM, so a time limit loses no step; otherwise submitit's own handler runs."""
    idle_term, submitits = signal.getsignal(signal.SIGTERM), signal.getsignal(signum)

    def handler(received: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is not idle_term:
            signal.raise_signal(signal.SIGTERM)  # the trainer's handler: stop after this step
        elif callable(submitits):
            submitits(received, frame)

    signal.signal(signum, handler)


class CellJob:
    """What each job runs, on every rank: one cell of a study file (``run_cell_job``).

    Preemption: SIGTERM (Slurm's preemption, ``scancel --signal=TERM``) makes the trainer checkpoint
    after the current step and raise Preempted on every rank; rank 0 of a Slurm job then requeues the
    job and all ranks exit without a result, so submitit keeps waiting for the requeued run, which
    resumes the cell from that checkpoint. The time limit's signal (submitit's ``--signal=USR2@90``)
    does the same while the cell trains (``_stop_training_on``); at any other time it follows
    submitit's checkpointing protocol: ``checkpoint`` resubmits the same call, submitit requeues the
    job, and the requeued run resumes from the cell's last checkpoint. A job killed outright leaves the cell 'running' with a
    heartbeat that goes stale; the next ``pretextlab study`` takes it over. A cancelled job (plain
    ``scancel``, or ``--signal=KILL``, which Slurm sends as a cancel: TERM, KillWait, KILL) checkpoints
    like a preempted one but is not requeued; the next study resumes the cell.
    """

    def __call__(self, study_file: str, out: str, config_hash: str) -> str:
        from pretextlab.training import Preempted

        ranks = job_ranks()
        if ranks.job is not None:  # in a submitit job, which has set its signal handlers
            _stop_training_on(_checkpoint_signal())
        try:
            return run_cell_job(study_file, out, config_hash, ranks)
        except Preempted:
            if not (ranks.job or "").startswith("slurm:"):
                raise  # the local executor cannot requeue: the cell is interrupted, the next study resumes it
            # Only a job still running was signalled to make room (scancel --signal=TERM, a preemption
            # that sends TERM): a cancelled job (scancel, whose TERM comes before its KILL) stays
            # cancelled, and one Slurm requeues itself (PreemptMode=REQUEUE) needs nothing more.
            if ranks.is_main and slurm_state(ranks.job.partition(":")[2]) == "RUNNING":  # type: ignore[union-attr]
                _requeue(ranks.job)  # type: ignore[arg-type]
            # As submitit does after requeueing: exit without a result, the requeued run writes it.
            # Ranks other than 0 exit cleanly: srun's --kill-on-bad-exit must not end rank 0 before it requeued.
            sys.exit(-1 if ranks.is_main else 0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpointing protocol: the requeued job makes the same call (the cell's state
        is its run directory's checkpoint and the store, not this object)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)
