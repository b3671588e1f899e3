"""A cell's job and the time limit's signal (issue 18): while the trainer holds SIGTERM, submitit's
checkpoint signal (USR2) is handed to it as SIGTERM, so the cell checkpoints after its current step
and is requeued like a preempted one; at any other time submitit's own handler runs. Real signals,
in this process. (The requeue itself, on a real Slurm: tests/test_slurm.py.)"""

import signal

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
