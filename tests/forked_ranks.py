"""The ranks of a multi-process (gloo) job as children forked from the test process (forked_cli.py).

Why: torchrun costs three fresh interpreters (its launcher and two ranks, ~7 CPU-s of imports
together) before a rank does anything. A rank only needs the environment torchrun gives it (RANK,
WORLD_SIZE, MASTER_ADDR, ...): pretextlab's distributed path reads that and joins the group
itself, so the code under test is the same. The parent never joins a group; each child does.
Real torchrun launches stay where users' command line is the thing tested
(tests/test_lbfgs_distributed.py).
"""

from __future__ import annotations

import os
import runpy
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch.distributed  # noqa: F401  (imported before the forks, so no child pays for it)

from forked_cli import ForkedProcess


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """What `torchrun --standalone --nproc-per-node WORLD_SIZE` puts in rank ``rank``'s environment."""
    return {**(os.environ if base is None else base), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def forked_ranks(target: Callable[[int], int | None], world_size: int = 2, *, argv: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> list[ForkedProcess]:
    """``target(rank)`` in one forked child per rank, each with its torchrun environment."""
    port = free_port()
    return [ForkedProcess(lambda rank=rank: target(rank), argv=argv, env=torchrun_env(rank, world_size, port, env), cwd=cwd)
            for rank in range(world_size)]


def script(path: Path) -> Callable[[int], None]:
    """A rank target running the script at ``path`` as its main program (sys.argv[1:] is the rank's argv)."""
    def run(rank: int) -> None:  # None: run_path's result (the script's globals) is no exit code
        runpy.run_path(str(path), run_name="__main__")

    return run


def finish(ranks: Sequence[ForkedProcess], timeout: float = 300) -> list[tuple[str, str]]:
    """Each rank's (stdout, stderr) once all have ended; none is left running, whatever happens."""
    try:
        return [rank.communicate(timeout=timeout) for rank in ranks]
    finally:
        stop(ranks)


def stop(ranks: Sequence[ForkedProcess]) -> None:
    """Kills (SIGKILL) and reaps the ranks still running."""
    for rank in ranks:
        if rank.poll() is None:
            rank.kill()
            rank.wait()
