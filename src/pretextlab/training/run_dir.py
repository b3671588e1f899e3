"""The run directory: its files, their format version, the run lock, checkpoint identity and metrics.

A run lives in one directory:

    config.json         the resolved config (the complete recipe), its hash, world size, format version
    metrics.jsonl       one JSON line per logged step and per epoch's validation
    checkpoint.pt       the last checkpoint (written atomically: a crash never leaves half a file)
    checkpoint.json     its identity (step, SHA-256), keyed to the file's inode, size and mtime
    checkpoint.prev.pt  the checkpoint before (and checkpoint.prev.json): the fallback if the last is damaged
    train.lock          flock'd by the train using the directory, holding its PID
    summary.json        written when the run has finished
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretextlab import atomic
from pretextlab.config import TrainConfig, config_differences
from pretextlab.errors import PretextlabError

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before: the fallback if checkpoint.pt is damaged
LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# config.json's layout. 1: "format_version", "world_size" and "global_batch_images" beside
# "config" and "hash"; a config.json without a version (written before 1) reads the same way.
RUN_FORMAT_VERSION = 1


@dataclass
class RunFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_FILE

    @property
    def previous_checkpoint(self) -> Path:
        return self.root / PREVIOUS_CHECKPOINT_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE


def notice(message: str) -> None:
    """A line for the person running the command (stderr: stdout carries JSON only)."""
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


# -- config.json ------------------------------------------------------------------------------------


def read_run_config(path: Path) -> dict[str, Any]:
    """config.json as written by the trainer (any version up to this one), or one clear error naming the file."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PretextlabError(
            f"{path} cannot be read as JSON ({error}): restore it, or start the run again in a new --out"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise PretextlabError(
            f"{path} is not a pretextlab run config (expected an object with a \"config\" object): "
            "restore it, or start the run again in a new --out"
        )
    version = saved.get("format_version", 0)
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise PretextlabError(
            f"{path} has run format version {version!r}, newer than this pretextlab reads ({RUN_FORMAT_VERSION}): "
            "upgrade pretextlab to use this run"
        )
    return saved


def load_config(run_dir: str | Path) -> TrainConfig:
    path = RunFiles(Path(run_dir)).config
    if not path.exists():
        raise PretextlabError(f"{run_dir} is not a pretextlab run (no {CONFIG_FILE}): pass the --out of a train run")
    try:
        # from_saved: keys older versions did not write mean what those runs were trained with (issue 16).
        return TrainConfig.from_saved(read_run_config(path)["config"])
    except (PretextlabError, TypeError) as error:
        raise PretextlabError(f"{path} does not describe a run this version can load: {error}") from None


def config_record(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What config.json holds for a run of ``config`` on ``world_size`` processes."""
    return {
        "format_version": RUN_FORMAT_VERSION,
        "config": config.to_dict(),
        "hash": config.config_hash(),
        # Recorded, not hashed: the recipe is per-process batch x world size (docs/protocol.md).
        "world_size": world_size,
        "global_batch_images": config.batch_size * world_size,
    }


def check_resumable(files: RunFiles, new: dict[str, Any], resume: bool, force: bool) -> dict[str, Any]:
    """``new`` (a config record) checked against the run already in ``files``; forced changes recorded."""
    if not files.config.exists():
        return new
    old = read_run_config(files.config)
    if not resume:
        raise PretextlabError(f"{files.root} already holds a run: pass --resume to continue it, or choose a new --out")
    differences = config_differences(old["config"], new["config"])
    if differences and not force:
        raise PretextlabError(
            f"cannot resume {files.root}: its config differs from this one ({'; '.join(differences)}); "
            "use the run's own settings, a new --out, or --force to resume with the new settings"
        )
    if differences:
        warnings.warn(f"resuming {files.root} with a changed config (--force): {'; '.join(differences)}")
        return {**new, "forced_changes": old.get("forced_changes", []) + [differences]}
    return new


# -- where a run may live, and one train at a time --------------------------------------------------


_KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")
_FILE_SYSTEMS_UNDER_DEV = ("/dev/shm",)  # a tmpfs: a fine place for a scratch run


def check_out_dir(root: Path) -> None:
    """Refuse a --out that cannot hold a run, before anything is created."""
    resolved = Path(os.path.abspath(root))
    for kernel in _KERNEL_FILESYSTEMS:
        allowed = any(resolved == Path(ok) or Path(ok) in resolved.parents for ok in _FILE_SYSTEMS_UNDER_DEV)
        if not allowed and (resolved == Path(kernel) or Path(kernel) in resolved.parents):
            raise PretextlabError(f"--out {root} is under {kernel}, which is not a place for files: choose a directory on a disk")
    if resolved.exists() and not resolved.is_dir():
        raise PretextlabError(f"--out {root} is a file, not a directory: choose a new --out")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir():
        raise PretextlabError(f"--out {root} is under {existing}, which is a file: choose a --out inside a directory")
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if read_only else "is not writable by this user"
        raise PretextlabError(f"--out {root}: {existing} {why}: choose a writable --out")


class RunLock:
    """An exclusive flock on RUN_DIR/train.lock holding the owner's PID: one train per run directory.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale lock file never
    blocks a resume.
    """

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self.handle: Any = None

    def acquire(self) -> None:
        if self.handle is not None:
            return
        handle = open(self.files.lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            who = "this process" if pid == str(os.getpid()) else f"PID {pid}"
            raise PretextlabError(
                f"{self.files.root} is in use by another pretextlab train ({who}): wait for it to finish or stop it, "
                "then --resume; or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def start_run_dir(files: RunFiles, lock: RunLock, record: dict[str, Any]) -> None:
    """Create the directory, take the lock, clear orphan temporary files, write config.json."""
    try:
        files.root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        for orphan in files.root.glob(".*.tmp"):  # left by a process killed mid-write (atomic.py)
            orphan.unlink(missing_ok=True)
        atomic.write_json(files.config, record)
    except OSError as error:
        raise PretextlabError(
            f"cannot write the run directory {files.root}: {error.strerror or error}; choose a writable --out"
        ) from None


# -- checkpoint identity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which weights a result came from: the step saved, the SHA-256 of the checkpoint file's bytes,
    the run's planned length, and whether the run had finished at that step."""

    step: int
    sha256: str
    total_steps: int | None
    finished: bool
    file: str = field(default=CHECKPOINT_FILE, compare=False)  # checkpoint.pt or the fallback checkpoint.prev.pt


def _sidecar(checkpoint: Path) -> Path:
    # checkpoint.pt -> checkpoint.json, checkpoint.prev.pt -> checkpoint.prev.json
    return checkpoint.with_suffix(".json")


def _sha256_of(handle: Any) -> str:
    digest = hashlib.sha256()
    handle.seek(0)
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    handle.seek(0)
    return digest.hexdigest()


def _file_key(stat: os.stat_result) -> dict[str, int]:
    # A checkpoint is only ever replaced by a rename, never rewritten in place, so a new file has a
    # new inode and mtime: a sidecar whose key matches describes exactly these bytes.
    return {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verified_sidecar(checkpoint: Path, handle: Any) -> dict[str, Any] | None:
    try:
        meta = json.loads(_sidecar(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in _file_key(os.fstat(handle.fileno())).items()):
        return None
    if not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("step"), int):
        return None
    return meta


def write_checkpoint(files: RunFiles, state: dict[str, Any]) -> None:
    """Save ``state`` as checkpoint.pt, the current one becoming checkpoint.prev.pt, with identities."""

    def keep_previous() -> None:
        # Sidecars are keyed to their file's inode, so a crash between these renames leaves, at
        # worst, a sidecar that no longer matches and is ignored (the hash is then recomputed).
        if files.checkpoint.exists():
            os.replace(files.checkpoint, files.previous_checkpoint)
        if _sidecar(files.checkpoint).exists():
            os.replace(_sidecar(files.checkpoint), _sidecar(files.previous_checkpoint))

    atomic.save_torch(files.checkpoint, state, before_replace=keep_previous)
    with open(files.checkpoint, "rb") as handle:
        meta = {"step": int(state["step"]), "total_steps": state.get("total_steps"), "sha256": _sha256_of(handle),
                **_file_key(os.fstat(handle.fileno()))}
    atomic.write_json(_sidecar(files.checkpoint), meta)


def _read_checkpoint(path: Path, map_location: Any, need_state: bool) -> tuple[dict[str, Any] | None, str, int, int | None]:
    """(state or None, sha256, step, total_steps) of one checkpoint file, read through one handle so
    the hash and the weights belong to the same bytes even if a save replaces the file meanwhile."""
    with open(path, "rb") as handle:
        meta = _verified_sidecar(path, handle)
        if meta is not None and not need_state:
            return None, meta["sha256"], meta["step"], meta.get("total_steps")
        sha256 = meta["sha256"] if meta is not None else _sha256_of(handle)
        state = torch.load(handle, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or not {"network", "task", "step"} <= set(state):
        raise ValueError("not a pretextlab checkpoint (no network/task/step entries)")
    return state, sha256, int(state["step"]), state.get("total_steps")


def _finished_at(files: RunFiles, step: int) -> bool:
    try:
        summary = json.loads(files.summary.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("steps") == step


def has_checkpoint(files: RunFiles) -> bool:
    return files.checkpoint.exists() or files.previous_checkpoint.exists()


def load_checkpoint(
    run_dir: str | Path, map_location: Any = "cpu", need_state: bool = True
) -> tuple[dict[str, Any] | None, CheckpointIdentity]:
    """The newest loadable checkpoint of a run: checkpoint.pt, else (damaged or missing) the previous one."""
    files = RunFiles(Path(run_dir))
    problems: list[str] = []
    for _ in range(3):  # a concurrent save may rotate the files between our look and our open
        problems = []
        for path in (files.checkpoint, files.previous_checkpoint):
            try:
                state, sha256, step, total_steps = _read_checkpoint(path, map_location, need_state)
            except FileNotFoundError:
                continue
            except Exception as error:  # torch raises many kinds on a truncated or garbled zip
                problems.append(f"{path} is damaged ({type(error).__name__}: {str(error)[:120]})")
                continue
            if problems or path != files.checkpoint:
                notice(f"{'; '.join(problems) or f'{files.checkpoint} is missing'}: using {path.name} (step {step})")
            return state, CheckpointIdentity(step, sha256, total_steps, _finished_at(files, step), path.name)
        if problems:
            break
    if problems:
        raise PretextlabError(
            f"{'; '.join(problems)}, and there is no loadable previous checkpoint: "
            f"train the run again (pretextlab train ... --out {run_dir})"
        )
    raise PretextlabError(f"{run_dir} has no checkpoint yet: train it first (pretextlab train ... --out {run_dir})")


def checkpoint_identity(run_dir: str | Path) -> CheckpointIdentity:
    """The identity of the checkpoint that load_trained(run_dir) returns the weights of."""
    return load_checkpoint(run_dir, need_state=False)[1]


# -- metrics.jsonl ----------------------------------------------------------------------------------


def _metrics_line(line: str, path: Path, number: int, last: bool) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        if last:  # a torn tail: the disk filled (or the process died) mid-append
            return None
        raise PretextlabError(
            f"{path} line {number} is not JSON ({line[:40]!r}): remove that line (or restore the file) and run again"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise PretextlabError(f"{path} line {number} is not a metrics record: remove that line and run again")
    return record


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl; a torn last line (a full disk mid-append) is ignored."""
    path = RunFiles(Path(run_dir)).metrics
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            record = _metrics_line(line, path, number, last=number == len(lines))
            if record is not None:
                records.append(record)
    return records


def append_metrics(files: RunFiles, record: dict[str, Any]) -> None:
    """Append one record; on a failed write (a full disk) the partial line is taken back, then OSError."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(files.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def trim_metrics(files: RunFiles, step: int) -> None:
    """Keep the records up to ``step`` (a resume logs the later ones again) and drop a torn last line."""
    if files.metrics.exists():
        kept = [m for m in read_metrics(files.root) if m["step"] <= step]
        atomic.write_text(files.metrics, "".join(json.dumps(m) + "\n" for m in kept))
