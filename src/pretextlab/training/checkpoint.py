"""Checkpoints and their identity: checkpoint.pt, the previous one as fallback, each with a sidecar.

A result records which weights it came from (``CheckpointIdentity``: step, SHA-256 of the file's
bytes, planned length, finished or not); the sidecar (checkpoint.json) keeps that hash keyed to the
file's inode, size and mtime, so reading an identity costs no re-hash while the file is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretextlab import atomic
from pretextlab.errors import PretextlabError
from pretextlab.training.run_dir import CHECKPOINT_FILE, RunFiles, notice


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

    # A Ctrl-C or SIGTERM during the save is delivered once the checkpoint and its sidecar are both
    # written, so the run stops as it does between steps, with this checkpoint whole (README
    # "What a fault leaves behind").
    with atomic.signals_held():
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
