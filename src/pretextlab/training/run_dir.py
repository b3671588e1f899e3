"""The run directory: its files, their format version, the run lock and metrics (checkpoints: checkpoint.py).

A run lives in one directory:

    config.json         the resolved config (the complete recipe) by section, its hash, world size, format version
    metrics.jsonl       one JSON line per logged step and per epoch's validation
    checkpoint.pt       the last checkpoint (written atomically: a crash never leaves half a file)
    checkpoint.json     its identity (step, SHA-256), keyed to the file's inode, size and mtime
    checkpoint.prev.pt  the checkpoint before (and checkpoint.prev.json): the fallback if the last is damaged
    train.lock          flock'd by the train using the directory, holding its PID
    summary.json        written when the run has finished
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretextlab import atomic
from pretextlab.config import TrainConfig, config_differences
from pretextlab.errors import PretextlabError
from pretextlab.options import section_fields
from pretextlab.tasks.base import own_fields

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before: the fallback if checkpoint.pt is damaged
LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# config.json's layout. 1: "format_version", "world_size" and "global_batch_images" beside
# "config" (every option, flat) and "hash"; a config.json without a version (written before 1)
# reads the same way. 2: the options by section instead of "config" (``config_sections``).
RUN_FORMAT_VERSION = 2
# The sections config.json holds as option: value objects (the task's has its own shape).
_PLAIN_SECTIONS = ("data", "network", "optimisation", "runtime")


# Each path of a run directory: RunFiles' attribute -> file name.
_RUN_FILES = {
    "config": CONFIG_FILE,
    "checkpoint": CHECKPOINT_FILE,
    "previous_checkpoint": PREVIOUS_CHECKPOINT_FILE,
    "metrics": METRICS_FILE,
    "summary": SUMMARY_FILE,
    "lock": LOCK_FILE,
}


@dataclass
class RunFiles:
    """The paths of the files in the run directory ``root`` (the module docstring says what each holds)."""

    root: Path
    config: Path = field(init=False, repr=False)
    checkpoint: Path = field(init=False, repr=False)
    previous_checkpoint: Path = field(init=False, repr=False)
    metrics: Path = field(init=False, repr=False)
    summary: Path = field(init=False, repr=False)
    lock: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, file_name in _RUN_FILES.items():
            setattr(self, name, self.root / file_name)


def notice(message: str) -> None:
    """A line for the person running the command (stderr: stdout carries JSON only)."""
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


# -- config.json ------------------------------------------------------------------------------------


def _not_a_run_config(path: Path, why: str) -> PretextlabError:
    return PretextlabError(
        f"{path} is not a pretextlab run config ({why}): restore it, or start the run again in a new --out"
    )


def read_run_config(path: Path) -> dict[str, Any]:
    """config.json as written by the trainer (any version up to this one), or one clear error naming the file."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PretextlabError(
            f"{path} cannot be read as JSON ({error}): restore it, or start the run again in a new --out"
        ) from None
    if not isinstance(saved, dict):
        raise _not_a_run_config(path, "expected a JSON object")
    # The version before the layout: a newer file may be laid out in a way this one cannot read.
    version = saved.get("format_version", 0)
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise PretextlabError(
            f"{path} has run format version {version!r}, newer than this pretextlab reads ({RUN_FORMAT_VERSION}): "
            "upgrade pretextlab to use this run"
        )
    saved_options(saved, path)  # the layout of its version, or the error now
    return saved


def saved_options(saved: dict[str, Any], path: Path | str = CONFIG_FILE) -> dict[str, Any]:
    """Every option of a config.json record by name, flat (as ``TrainConfig.to_dict``), whichever
    version wrote it: what load, resume and the hash read, so a format-1 run keeps its values."""
    if saved.get("format_version", 0) < 2:
        if not isinstance(saved.get("config"), dict):
            raise _not_a_run_config(path, 'expected an object with a "config" object')
        return saved["config"]
    owner = {name: section for section, names in section_fields(TrainConfig).items() for name in names}
    flat: dict[str, Any] = {}
    for section in (*_PLAIN_SECTIONS, "task"):
        values = saved.get(section)
        if not isinstance(values, dict):
            raise _not_a_run_config(path, f'expected a "{section}" object')
        if section == "task":
            values = _task_section_options(values, owner, path)
        misplaced = sorted(k for k in values if owner.get(k, section) != section)
        if misplaced:
            raise _not_a_run_config(path, ", ".join(f"{k} belongs in {owner[k]}, not {section}" for k in misplaced))
        flat.update(values)
    return flat


def _task_section_options(task: dict[str, Any], owner: dict[str, str], path: Path | str) -> dict[str, Any]:
    """The flat options of config.json's task section: its name, its own options and the others'."""
    options, others = task.get("options"), task.get("other_tasks_options")
    if not isinstance(task.get("name"), str) or not isinstance(options, dict) or not isinstance(others, dict):
        raise _not_a_run_config(path, 'expected a task object with "name", "options" and "other_tasks_options"')
    if ":" in task["name"]:
        # A plug-in task's own options are no flags: it runs with their defaults, so the values
        # recorded are for people; loading gives the task its defaults again.
        options = {k: v for k, v in options.items() if owner.get(k) == "task"}
    return {"task": task["name"], **others, **options}


def load_config(run_dir: str | Path) -> TrainConfig:
    path = RunFiles(Path(run_dir)).config
    if not path.exists():
        raise PretextlabError(f"{run_dir} is not a pretextlab run (no {CONFIG_FILE}): pass the --out of a train run")
    try:
        # from_saved: keys older versions did not write mean what those runs were trained with (issue 16).
        return TrainConfig.from_saved(saved_options(read_run_config(path), path))
    except (PretextlabError, TypeError) as error:
        raise PretextlabError(f"{path} does not describe a run this version can load: {error}") from None


def config_sections(config: TrainConfig) -> dict[str, Any]:
    """The options of ``config`` by section, as config.json (format 2) holds them: data, network,
    optimisation and runtime as option: value; the task as its name, its own options (the fields
    its options dataclass adds, as ``task_options`` gives them to it) and the other built-in tasks'
    options, which it never reads but the run's hash has always included (see ``saved_options``)."""
    values, sections = config.to_dict(), config.sections()
    own = {f.name: getattr(sections.task.options, f.name) for f in own_fields(type(sections.task.options))}
    task = {
        "name": config.task,
        "options": own,
        "other_tasks_options": {k: values[k] for k in section_fields(TrainConfig)["task"] if k not in own and k != "task"},
    }
    nested = {name: dataclasses.asdict(getattr(sections, name)) for name in _PLAIN_SECTIONS}
    return {"data": nested["data"], "network": nested["network"], "task": task,
            "optimisation": nested["optimisation"], "runtime": nested["runtime"]}


def config_record(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What config.json holds for a run of ``config`` on ``world_size`` processes."""
    return {
        "format_version": RUN_FORMAT_VERSION,
        **config_sections(config),
        # Of the same flat options as a format-1 file's "config": one run, one hash, whichever file.
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
    # Flat, whichever version wrote the old file: a format-1 run resumes on the same values.
    differences = config_differences(saved_options(old, files.config), saved_options(new))
    # The recipe is the per-process batch x the number of processes (docs/protocol.md): the global
    # batch, the learning rate scaled by it and the steps per epoch all follow it, so a resume on
    # another number of processes would quietly continue another recipe. (Files from before the
    # field existed are not checked.)
    trained_on = old.get("world_size")
    if trained_on is not None and trained_on != new["world_size"]:
        differences.append(
            f"processes: {trained_on} -> {new['world_size']} (global batch {old.get('global_batch_images')} -> "
            f"{new['global_batch_images']} images); launch it on {trained_on} process(es) as before "
            f"(torchrun --nproc-per-node, or the study's executor tasks_per_node x nodes)"
        )
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
