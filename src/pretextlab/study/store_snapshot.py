"""A read-only look at a results store file: a private in-memory copy taken without writing a byte to the file or beside it."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path

from pretextlab.errors import PretextlabError


def _uri(path: Path, immutable: bool) -> str:
    # https://www.sqlite.org/uri.html: mode=ro never writes the database; immutable=1 also skips
    # the locks and the -wal/-shm files, which mode=ro alone creates beside a WAL-mode file.
    query = "mode=ro&immutable=1" if immutable else "mode=ro"
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


def _signature(path: Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _copy(uri: str) -> sqlite3.Connection:
    """The whole database at ``uri`` copied into memory, in one read transaction (one consistent state)."""
    source = sqlite3.connect(uri, uri=True)
    try:
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            source.backup(memory)
        except BaseException:
            memory.close()
            raise
        return memory
    finally:
        source.close()


def snapshot(path: Path) -> sqlite3.Connection:
    """An in-memory copy of the store at ``path`` (autocommit, like a writer's connection).

    No -wal file beside it means no writer has it open and the file alone is the database: it is
    read as immutable, which creates nothing and works on a read-only file system. A writer could
    start (and checkpoint into the file) while it is copied, so the file's inode, size and times are
    compared before and after; if they moved, or a -wal file exists (a study is running, or one
    stopped mid-write), the file is read through SQLite's ordinary read-only path, which sees the
    WAL and takes the reader's locks (using the -wal/-shm files a writer already made).
    """
    wal = path.with_name(path.name + "-wal")
    if not wal.exists():
        before = _signature(path)
        memory = _copy(_uri(path, immutable=True))
        if _signature(path) == before:
            return memory
        memory.close()
    try:
        return _copy(_uri(path, immutable=False))
    except sqlite3.OperationalError as error:
        if "readonly" not in str(error) and "unable to open" not in str(error):
            raise
        raise PretextlabError(
            f"{path} cannot be read without writing beside it (SQLite says: {error}): a study is writing it "
            f"or stopped mid-write and left {wal.name}; run `pretextlab study FILE` once where the file is "
            "writable (it finishes the write), then read it again"
        ) from error
