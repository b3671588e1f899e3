"""A cell's job and the time limit's signal (issue 18): while the trainer holds SIGTERM, submitit's
checkpoint signal (USR2) is handed to it as SIGTERM, so the cell checkpoints after its current step
and is requeued like a preempted one; at any other time submitit's own handler runs. Real signals,
in this process. (The requeue itself, on a real Slurm: tests/test_slurm.py.) And a multi-rank cell's
ranks learn of a failure in rank 0's store work instead of waiting for it: two real gloo ranks."""

import signal

import torch.distributed as dist

from forked_ranks import finish, forked_ranks
from pretextlab.errors import PretextlabError
from pretextlab.study.cell import JobRanks, _from_rank0, _leave_group, _RankZeroFailed
from pretextlab.study.cell_job import _checkpoint_signal, _stop_training_on


def test_the_checkpoint_signal_reaches_the_trainer_while_it_trains_else_submitit():
    calls = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        idle = lambda signum, frame: calls.append(("idle", signum))  # noqa: E731  submitit's SIGTERM bypass
        signal.signal(signal.SIGTERM, idle)
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(("submitit", signum)))
        assert _checkpoint_signal() == signal.SIGUSR2
        _stop_training_on(signal.SIGUSR2)

        signal.raise_signal(signal.SIGUSR2)  # probing: submitit checkpoints and requeues
        # Training: the trainer's stop_on_sigterm handler is installed.
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(("trainer", signum)))
        signal.raise_signal(signal.SIGUSR2)
        signal.signal(signal.SIGTERM, idle)  # training over: back to submitit
        signal.raise_signal(signal.SIGUSR2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert calls == [("submitit", signal.SIGUSR2), ("trainer", signal.SIGTERM), ("submitit", signal.SIGUSR2)]


def _rank_zero_fails(rank: int) -> None:
    """Every rank of a cell's job runs this: rank 0's store work fails once, then succeeds."""
    dist.init_process_group("gloo")
    ranks = JobRanks(rank=dist.get_rank(), world_size=2)

    def lost_store():
        raise PretextlabError("the store is gone")

    try:
        _from_rank0(lost_store, ranks)
    except _RankZeroFailed:
        print("told")
    except PretextlabError as error:
        print("raised:", error)
    print(_from_rank0(lambda: ["rank 0's plan"], ranks))
    # Leave as a cell does: a process that exits with the group alive can abort in gloo's threads.
    _leave_group(ranks)


def test_a_rank_zero_failure_in_its_store_work_reaches_the_other_ranks_instead_of_a_hang():
    # Two real gloo ranks, forked from this process (no interpreter start-up each): before, rank 1 waited in the next collective for a rank 0 that had
    # raised (until the group's 30-minute timeout); now it is told at once.
    ranks = forked_ranks(_rank_zero_fails)
    outputs = finish(ranks, timeout=120)
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.splitlines() for out, _ in outputs] == [["raised: the store is gone", '["rank 0\'s plan"]'], ["told", '["rank 0\'s plan"]']]
