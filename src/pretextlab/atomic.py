"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash or a full disk mid-write leaves the previous file untouched, never a half-written one; a
Ctrl-C or SIGTERM during a torch.save waits for the file to be whole (``signals_held``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator



def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in directory ``path`` durable: a crash after os.replace
    could otherwise lose the rename itself on filesystems that journal metadata lazily."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. a platform without directory handles: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


# The handlers whose action would cut a write short: the default action (the process ends) and
# Python's Ctrl-C handler (KeyboardInterrupt, which inside torch.save's zip writer surfaces as
# "RuntimeError ... unexpected pos" instead). A handler the program installed itself (the
# trainer's preemption flag, submitit's) stays in place: it is the program's own choice, and
# study/cell_job.py tells the trainer is running by which SIGTERM handler is installed.
_ABORTING = (signal.SIG_DFL, signal.default_int_handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """While inside, a SIGINT or SIGTERM that would abort the process or raise KeyboardInterrupt is
    only recorded; once the block is over it is delivered again to the handler it would have
    reached, so the file being written is complete and the stop then happens as it would have.
    A no-op outside the main thread (only it can set handlers, and only it runs them)."""
    arrived: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if signum not in arrived:
            arrived.append(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) in _ABORTING:
                previous[signum] = signal.signal(signum, hold)
    except ValueError:  # not the main thread: it never runs Python signal handlers anyway
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in arrived:
            # After restoring: SIGINT raises KeyboardInterrupt here, SIGTERM's default ends the process
            signal.raise_signal(signum)


def _atomic(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str, before_replace: Callable[[], None] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and reports are meant to be shared
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            # e.g. keep the current checkpoint as the previous one; only once the new file is whole
            before_replace()
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return _atomic(path, lambda h: h.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), "w")


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda h: h.write(text), "w")


def write_bytes(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Atomically write a binary file whose content ``write(handle)`` produces (e.g. savefig)."""
    return _atomic(path, write, "wb")


def save_torch(path: str | os.PathLike, obj: Any, before_replace: Callable[[], None] | None = None) -> Path:
    """torch.save ``obj`` atomically; ``before_replace`` runs once the new file is complete and
    synced, just before it takes ``path``'s place. A SIGINT or SIGTERM meanwhile is held until the
    file is in place (torch's zip writer cannot be interrupted cleanly), then delivered."""
    with signals_held():
        import torch  # here, not above: the results store uses this module and loads without torch

        return _atomic(path, lambda h: torch.save(obj, h), "wb", before_replace)


def save_numpy(path: str | os.PathLike, array: Any) -> Path:
    import numpy as np

    return _atomic(path, lambda h: np.save(h, array), "wb")
