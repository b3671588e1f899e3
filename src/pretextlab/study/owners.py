"""Who holds a study cell: a worker's id (host, process, cluster job) and whether a holder is gone."""

from __future__ import annotations

import os
import socket

__all__ = ["owner_is_dead", "same_job", "worker_id"]


def worker_id(job: str | None = None) -> str:
    """This process as 'host:pid', the owner recorded on the cells it holds; in a cluster job
    'host:pid@job' (e.g. 'gpu07:4711@slurm:123_4'), so a requeued run of the same job knows the cell is its own."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{job}" if job else "")


def same_job(holder: str | None, owner: str) -> bool:
    """Both owners name the same cluster job: the holder is this job before it was requeued."""
    return bool(holder) and "@" in owner and holder.partition("@")[2] == owner.partition("@")[2]


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a process of this machine that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.partition("@")[0].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
