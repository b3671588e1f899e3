"""Preemption: SIGTERM asks a run to checkpoint after the current step and stop (``Preempted``)."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

from pretextlab.errors import PretextlabError


class Preempted(PretextlabError):
    """The run received SIGTERM (or SIGINT under a scheduler) and stopped after checkpointing."""


@contextlib.contextmanager
def stop_on_sigterm(request_stop: Callable[[int], None]) -> Iterator[None]:
    """While inside, SIGTERM (a preempted job) calls ``request_stop(signum)`` instead of killing the
    process, so the loop can checkpoint after the current step; the previous handler comes back after."""
    def handler(signum: int, frame: Any) -> None:
        request_stop(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
