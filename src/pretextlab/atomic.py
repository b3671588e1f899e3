"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash or a full disk mid-write leaves the previous file untouched, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


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
    synced, just before it takes ``path``'s place."""
    return _atomic(path, lambda h: torch.save(obj, h), "wb", before_replace)


def save_numpy(path: str | os.PathLike, array: Any) -> Path:
    import numpy as np

    return _atomic(path, lambda h: np.save(h, array), "wb")
