"""The pretext trainer: the study's schedule, mixed precision, atomic checkpoints, exact resume.

A run lives in one directory:

    config.json      the resolved config (the complete recipe) and its hash
    metrics.jsonl    one JSON line per logged step and per epoch's validation
    checkpoint.pt    the last checkpoint (written atomically: a crash never leaves half a file)
    summary.json     written when the run has finished

Resuming restores weights, optimizer, step (so the schedule and the data position) and the RNG
state. Augmentation randomness is a pure function of (seed, step, rank), so a resumed run sees the
very same batches and crops as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.config import TrainConfig, config_differences, resolve
from pretextlab.data import BatchLoader, DatasetSplits, ImageSet, batches_per_epoch, load_dataset
from pretextlab.distributed import all_reduce_sum, barrier, convert_sync_batchnorm, distributed_context
from pretextlab.errors import PretextlabError
from pretextlab.models import build_network, network_info
from pretextlab.tasks import PretextTask, TaskOptions, build_task, task_class

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before: the fallback if checkpoint.pt is damaged
LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise PretextlabError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PretextlabError(f"device {name!r} asked for but CUDA is not available here: use --device cpu")
    return device


def step_seed(seed: int, step: int, rank: int = 0, purpose: int = 0) -> int:
    """A well-mixed seed for one step's augmentations, independent across (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, purpose, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int, world_size: int = 1) -> float:
    """lr 0.1 x B/256 (B the global batch in images), linear warm-up, step decays; per step."""
    peak = config.base_lr * config.batch_size * world_size / 256.0
    epoch = step / steps_per_epoch
    if config.warmup_epochs and epoch < config.warmup_epochs:
        # Step s trains at (s + 1) / warm-up steps of the peak, never above it: a warm-up shorter
        # than one step (a short run, or many processes) would otherwise overshoot the peak.
        return peak * min(1.0, (step + 1) / (config.warmup_epochs * steps_per_epoch))
    passed = sum(1 for boundary in config.decay_epochs or () if epoch >= boundary)
    return peak * config.decay_factor**passed


def task_options(config: TrainConfig) -> TaskOptions:
    return TaskOptions(
        image_size=config.image_size,
        crop_scale=tuple(config.crop_scale),
        color_jitter=config.color_jitter,
        flip=config.flip,
        gray_probability=config.gray_probability,
        copies=config.copies,
        permutations_per_batch=config.permutations_per_batch,
        num_permutations=config.num_permutations,
        embedding_dim=config.embedding_dim,
        head_hidden=config.head_hidden,
        margin=config.margin,
        patch_size=config.patch_size,
        seed=config.seed,
        permutation_criterion=config.permutation_criterion,
        patch_eval_geometry=config.patch_eval_geometry,
        exemplar_normalization=config.exemplar_normalization,
        exemplar_color_distortion=config.exemplar_color_distortion,
    )


def build_model(config: TrainConfig) -> tuple[nn.Module, PretextTask]:
    """The network and the task's head that a (resolved) config describes."""
    task_cls = task_class(config.task)
    extra = {}
    if network_info(config.network).supports_reversible_backward and config.reversible_backward is not None:
        extra["reversible_backward"] = config.reversible_backward
    network = build_network(
        config.network,
        width=config.width,
        final_relu=config.final_relu,
        patch_mode=task_cls.patch_mode,
        representation_size=config.representation_size,
        input_size=config.patch_size if task_cls.patch_mode else config.image_size,
        **extra,
    )
    task = build_task(config.task, network.out_dim, task_options(config))
    return network, task


def optimizer_for(network: nn.Module, task: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Momentum SGD; weight decay on convolution kernels only, as in the study."""
    decayed, plain = [], []
    for module in (network, task):
        for param in module.parameters():
            if param.requires_grad:
                (decayed if param.ndim == 4 else plain).append(param)
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}],
        lr=0.0,
        momentum=config.momentum,
    )


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


MIN_VAL_SCORED = 100  # below this many scored samples an accuracy's standard error exceeds ~5 points


def _percent(value: float | None) -> str:
    return "not scored" if value is None else f"{value:.2f}%"


def notice(message: str) -> None:
    """A line for the person running the command (stderr: stdout carries JSON only)."""
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


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


def _write_sidecar(checkpoint: Path, step: int, total_steps: int | None) -> None:
    with open(checkpoint, "rb") as handle:
        meta = {"step": step, "total_steps": total_steps, "sha256": _sha256_of(handle), **_file_key(os.fstat(handle.fileno()))}
    atomic.write_json(_sidecar(checkpoint), meta)


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


def _load_checkpoint_files(
    run_dir: str | Path, map_location: Any = "cpu", need_state: bool = True
) -> tuple[dict[str, Any] | None, CheckpointIdentity]:
    """The newest loadable checkpoint of a run: checkpoint.pt, else (damaged or missing) the previous one."""
    files = RunFiles(Path(run_dir))
    problems: list[str] = []
    for attempt in range(3):  # a concurrent save may rotate the files between our look and our open
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
            identity = CheckpointIdentity(step, sha256, total_steps, _finished_at(files, step), path.name)
            return state, identity
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
    return _load_checkpoint_files(run_dir, need_state=False)[1]


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
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            record = _metrics_line(line, path, number, last=number == len(lines))
            if record is not None:
                records.append(record)
    return records


def load_config(run_dir: str | Path) -> TrainConfig:
    path = RunFiles(Path(run_dir)).config
    if not path.exists():
        raise PretextlabError(f"{run_dir} is not a pretextlab run (no {CONFIG_FILE}): pass the --out of a train run")
    try:
        return TrainConfig.from_dict(_read_run_config(path)["config"])
    except (PretextlabError, TypeError) as error:
        raise PretextlabError(f"{path} does not describe a run this version can load: {error}") from None


def _read_run_config(path: Path) -> dict[str, Any]:
    """config.json as written by the trainer, or one clear error naming the file."""
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
    return saved


def load_trained_identity(
    run_dir: str | Path, device: torch.device | str = "cpu"
) -> tuple[TrainConfig, nn.Module, PretextTask, CheckpointIdentity]:
    """load_trained's network and head together with the identity of the very checkpoint they come from."""
    config = load_config(run_dir)
    state, identity = _load_checkpoint_files(run_dir, map_location=device)
    assert state is not None
    network, task = build_model(config)
    network.load_state_dict(state["network"])
    task.load_state_dict(state["task"])
    return config, network.to(device).eval(), task.to(device).eval(), identity


def load_trained(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, nn.Module, PretextTask]:
    """The config, network and task head of a run, with the weights of its last (loadable) checkpoint."""
    config, network, task, _ = load_trained_identity(run_dir, device)
    return config, network, task


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


_KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")


def check_out_dir(root: Path) -> None:
    """Refuse a --out that cannot hold a run, before anything is created."""
    resolved = Path(os.path.abspath(root))
    for kernel in _KERNEL_FILESYSTEMS:
        if resolved == Path(kernel) or Path(kernel) in resolved.parents:
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


class PretextModel(nn.Module):
    """Network and task head as one module, so DistributedDataParallel sees every parameter."""

    def __init__(self, network: nn.Module, task: PretextTask) -> None:
        super().__init__()
        self.network = network
        self.task = task

    def forward(self, inputs: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.task(self.network(inputs)["pre_logits"], context)


class Preempted(PretextlabError):
    """The run received SIGTERM (or SIGINT under a scheduler) and stopped after checkpointing."""


class Trainer:
    """Trains one pretext run; ``fit`` can be interrupted at any point and resumed.

    Under torchrun every rank builds a Trainer; rank 0 alone writes files. The per-step statistics
    (loss, pretext accuracy, a non-finite loss, a stop signal) are summed over ranks in one
    all-reduce, so every rank takes the same decision at the same step.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        splits: DatasetSplits | None = None,
        force: bool = False,
    ) -> None:
        self.config = resolve(config)
        self.files = RunFiles(Path(run_dir))
        self.progress = progress
        device = resolve_device(self.config.device)
        self.dist = distributed_context(device.type)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.stop_requested: int | None = None  # set by a signal handler on this rank
        self.stopping = False  # agreed by all ranks at the last step
        self.lock = RunLock(self.files)
        try:
            self._setup(resume, force, splits)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: bool, force: bool, splits: DatasetSplits | None) -> None:
        # Everything that can refuse the run is checked before the run directory is created or
        # written, so a failed start leaves nothing behind that the corrected command would trip on.
        config_record = self._check_run_dir(resume, force) if self.dist.is_main else None
        self.splits = splits or load_dataset(
            self.config.dataset,
            data_dir=self.config.data_dir,
            image_size=self.config.decode_size,
            val_size=self.config.val_size,
            limit=self.config.limit,
            test_limit=self.config.test_limit,
            seed=self.config.seed,
        )
        torch.manual_seed(self.config.seed)
        self.network, self.task = build_model(self.config)
        self.channels_last = self.config.channels_last if self.config.channels_last is not None else self.device.type == "cuda"
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.config.sync_bn and self.dist.enabled:
            self.network = convert_sync_batchnorm(self.network, self.device.type)
            self.task = convert_sync_batchnorm(self.task, self.device.type)
        # fp64 is for exactness checks (e.g. one process against several): float32 roundoff is
        # amplified enormously by a deep BatchNorm network's first steps.
        self.dtype = torch.float64 if self.config.precision == "fp64" else torch.float32
        self.network.to(self.device, dtype=self.dtype, memory_format=memory_format)
        self.task.to(self.device, dtype=self.dtype)
        self.model: nn.Module = PretextModel(self.network, self.task)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.compiled = torch.compile(self.model) if self.config.compile else self.model
        self.optimizer = optimizer_for(self.network, self.task, self.config)
        precision = self.config.precision
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and self.device.type == "cuda") else None
        self.steps_per_epoch = batches_per_epoch(len(self.splits.train), self.config.batch_size, True, self.world_size)
        if self.steps_per_epoch < 1:
            raise PretextlabError(
                f"the training split has {len(self.splits.train)} images, fewer than one batch of "
                f"{self.config.batch_size}: lower --batch-size or raise --limit"
            )
        self.total_steps = math.ceil(self.config.epochs * self.steps_per_epoch)
        self.step = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.skipped = 0
        self.skipped_val = 0  # unreadable images of the validation split, at its last pass
        self.val_scored = 0  # samples scored by the last validation pass
        self.warned_val = False
        if self.dist.is_main:
            self._start_run_dir(config_record)
        barrier(self.dist)
        if resume and (self.files.checkpoint.exists() or self.files.previous_checkpoint.exists()):
            self._load_checkpoint()
        if resume and self.dist.is_main:
            self._trim_metrics()

    # -- run directory --------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool, force: bool) -> dict[str, Any]:
        """Refuse an unusable --out or a conflicting run; the config record to write once the run starts."""
        files = self.files
        check_out_dir(files.root)
        if files.root.is_dir():
            self.lock.acquire()
        new = {
            "config": self.config.to_dict(),
            "hash": self.config.config_hash(),
            # Recorded, not hashed: the recipe is per-process batch x world size (docs/protocol.md).
            "world_size": self.world_size,
            "global_batch_images": self.config.batch_size * self.world_size,
        }
        if files.config.exists():
            old = _read_run_config(files.config)
            if not resume:
                raise PretextlabError(
                    f"{files.root} already holds a run: pass --resume to continue it, or choose a new --out"
                )
            differences = config_differences(old["config"], new["config"])
            if differences and not force:
                raise PretextlabError(
                    f"cannot resume {files.root}: its config differs from this one ({'; '.join(differences)}); "
                    "use the run's own settings, a new --out, or --force to resume with the new settings"
                )
            if differences:
                warnings.warn(f"resuming {files.root} with a changed config (--force): {'; '.join(differences)}")
                new["forced_changes"] = old.get("forced_changes", []) + [differences]
        return new

    def _start_run_dir(self, config_record: dict[str, Any]) -> None:
        files = self.files
        try:
            files.root.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            for orphan in files.root.glob(".*.tmp"):  # left by a process killed mid-write (atomic.py)
                orphan.unlink(missing_ok=True)
            atomic.write_json(files.config, config_record)
        except OSError as error:
            raise PretextlabError(
                f"cannot write the run directory {files.root}: {error.strerror or error}; choose a writable --out"
            ) from None

    def _trim_metrics(self) -> None:
        # Lines logged after the checkpoint will be logged again, and a torn last line (a full disk
        # or a kill mid-append) is dropped: each step appears once and the file parses.
        if self.files.metrics.exists():
            kept = [m for m in read_metrics(self.files.root) if m["step"] <= self.step]
            atomic.write_text(self.files.metrics, "".join(json.dumps(m) + "\n" for m in kept))

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "network": self.network.state_dict(),
            "task": self.task.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config_hash": self.config.config_hash(),
            "total_steps": self.total_steps,
        }

    def _keep_previous_checkpoint(self) -> None:
        files = self.files
        # Sidecars are keyed to their file's inode, so a crash between these renames leaves, at
        # worst, a sidecar that no longer matches and is ignored (the hash is then recomputed).
        if files.checkpoint.exists():
            os.replace(files.checkpoint, files.previous_checkpoint)
        if _sidecar(files.checkpoint).exists():
            os.replace(_sidecar(files.checkpoint), _sidecar(files.previous_checkpoint))

    def _write_failed(self, error: OSError, path: Path) -> PretextlabError:
        code = errno.errorcode.get(error.errno or 0, "")
        kept = (
            f"the last checkpoint (step {self.saved_step}) is kept in {self.files.root}"
            if self.saved_step is not None else "no checkpoint had been saved yet"
        )
        return PretextlabError(
            f"could not write {path} at step {self.step}: {error.strerror or error}{f' ({code})' if code else ''}; "
            f"{kept}: free space (or fix the disk) and continue with --resume"
        )

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            try:
                atomic.save_torch(self.files.checkpoint, self._checkpoint_state(), before_replace=self._keep_previous_checkpoint)
                _write_sidecar(self.files.checkpoint, self.step, self.total_steps)
            except OSError as error:
                raise self._write_failed(error, self.files.checkpoint) from None
        self.saved_step = self.step

    def _load_checkpoint(self) -> None:
        state, identity = _load_checkpoint_files(self.files.root, map_location=self.device)
        assert state is not None
        self.saved_step = identity.step
        self.network.load_state_dict(state["network"])
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng.cpu() for rng in state["cuda_rng"]])

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.files.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError as error:
                # Take back a partial line (a full disk mid-append) so the file stays whole JSON lines.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise self._write_failed(error, self.files.metrics) from None
        finally:
            os.close(fd)

    # -- training -------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)

    def _forward(self, inputs: torch.Tensor, context: Any = None, train: bool = True) -> torch.Tensor:
        inputs = inputs.to(self.dtype)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            # Evaluation bypasses DDP: no gradient to reduce, and ranks may see different batch counts.
            model = self.compiled if train else PretextModel(self.network, self.task)
            return model(inputs, context)

    def _generator(self, step: int, purpose: int = 0) -> torch.Generator:
        # purpose 0: training steps; 1: validation batches (their own stream, fixed across evaluations)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(self.config.seed, step, self.rank, purpose))
        return generator

    def _epoch_batches(self) -> Iterator[Any]:
        epoch, start = divmod(self.step, self.steps_per_epoch)
        return iter(
            BatchLoader(
                self.splits.train,
                self.config.batch_size,
                shuffle=True,
                seed=self.config.seed,
                epoch=epoch,
                start_batch=start,
                drop_last=True,
                workers=self.config.workers,
                pin_memory=self.device.type == "cuda",
                rank=self.rank,
                world_size=self.world_size,
            )
        )

    def train_step(self, images: torch.Tensor) -> tuple[float, int, int]:
        self.network.train()
        self.task.train()
        lr = learning_rate(self.config, self.step, self.steps_per_epoch, self.world_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets, context = self.task.prepare(self._to_device(images), True, self._generator(self.step))
        outputs = self._forward(inputs, context)
        loss = self.task.loss(outputs, targets)
        right, scored = self.task.correct(outputs.detach(), targets)
        local_loss = loss.item()
        finite = math.isfinite(local_loss)
        # One all-reduce carries everything the ranks must agree on before the weights change.
        total_loss, right, scored, bad_ranks, stopping = all_reduce_sum(
            [local_loss if finite else 0.0, right, scored, 0.0 if finite else 1.0, 1.0 if self.stop_requested else 0.0],
            self.device,
            self.dist,
        )
        if bad_ranks:
            raise PretextlabError(
                f"the loss became {local_loss if not finite else 'non-finite on another rank'} at step {self.step}: "
                f"the run stopped and its last good checkpoint ({self.files.checkpoint}) is kept; "
                "lower the learning rate (--base-lr) and --resume"
            )
        self.stopping = bool(stopping)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return total_loss / self.world_size, int(right), int(scored)

    @torch.no_grad()
    def pretext_accuracy(self, images: ImageSet) -> float | None:
        """Pretext accuracy (%) of the current weights on ``images`` (the validation split), None
        when nothing could be scored (e.g. a validation split of one image)."""
        self.network.eval()
        self.task.eval()
        right = scored = skipped = 0
        loader = BatchLoader(
            images, self.config.batch_size, shuffle=False, drop_last=False, workers=self.config.workers,
            rank=self.rank, world_size=self.world_size,
        )
        for index, batch in enumerate(loader):
            if self.config.val_batches is not None and index >= self.config.val_batches:
                break
            skipped += batch.skipped
            if len(batch.labels) < 2:
                continue
            inputs, targets, context = self.task.prepare(self._to_device(batch.images), False, self._generator(index, purpose=1))
            r, s = self.task.correct(self._forward(inputs, context, train=False).float(), targets)
            right, scored = right + r, scored + s
        right, scored, skipped = all_reduce_sum([right, scored, skipped], self.device, self.dist)
        self.skipped_val = int(skipped)
        self.val_scored = int(scored)
        if scored and scored < MIN_VAL_SCORED and not self.warned_val and self.rank == 0:
            self.warned_val = True
            notice(
                f"warning: the validation pretext accuracy is over only {int(scored)} scored samples (under "
                f"{MIN_VAL_SCORED}), so it is noisy: raise --val-size or --val-batches for a firmer number"
            )
        return 100.0 * right / scored if scored else None

    @contextlib.contextmanager
    def _stop_on_sigterm(self) -> Iterator[None]:
        """SIGTERM (a preempted job) asks the run to checkpoint after the current step and stop."""
        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = signum

        try:
            previous = signal.signal(signal.SIGTERM, request_stop)
        except ValueError:  # not the main thread: leave signals to the caller
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def fit(self) -> dict[str, Any]:
        try:
            if self.files.summary.exists() and self.step >= self.total_steps:
                return json.loads(self.files.summary.read_text())
            with self._stop_on_sigterm():
                return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{self.config.task}/{self.config.network}",
            unit="step",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        window_loss, window_right, window_scored, window_start = 0.0, 0, 0, time.perf_counter()
        window_steps = 0
        val_accuracy: float | None = None
        validated = False
        try:
            while self.step < self.total_steps:
                for batch in self._epoch_batches():
                    if self.step >= self.total_steps:
                        break
                    self.skipped += batch.skipped
                    if len(batch.labels) >= 2:
                        loss, right, scored = self.train_step(batch.images)
                        window_loss, window_right, window_scored = window_loss + loss, window_right + right, window_scored + scored
                        window_steps += 1
                    # else: (almost) every image of this batch was unreadable; BatchNorm cannot train
                    # on it, but the step still counts so step numbers stay equal to batch positions.
                    self.step += 1
                    bar.update(1)
                    if window_steps and (self.step % self.config.log_every == 0 or self.step == self.total_steps):
                        elapsed = time.perf_counter() - window_start
                        record = {
                            "step": self.step,
                            "epoch": self.step / self.steps_per_epoch,
                            "lr": learning_rate(self.config, self.step - 1, self.steps_per_epoch, self.world_size),
                            "loss": window_loss / window_steps,
                            "pretext_accuracy_percent": 100.0 * window_right / window_scored if window_scored else None,
                            "images_per_s": window_steps * self.config.batch_size * self.world_size / max(elapsed, 1e-9),
                        }
                        self._log(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=_percent(record["pretext_accuracy_percent"]), lr=f"{record['lr']:.3g}")
                        window_loss, window_right, window_scored, window_steps = 0.0, 0, 0, 0
                        window_start = time.perf_counter()
                    end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    if end_of_epoch:
                        val_accuracy = self.pretext_accuracy(self.splits.val)
                        validated = True
                        self._log(
                            {
                                "step": self.step,
                                "epoch": self.step / self.steps_per_epoch,
                                "val_pretext_accuracy_percent": val_accuracy,
                                "val_pretext_scored": self.val_scored,
                                "skipped_images": self.skipped,
                                "skipped_val_images": self.skipped_val,
                            }
                        )
                        if self.rank == 0:
                            # stderr, beside the progress bar: stdout carries the JSON summary only
                            notice(f"epoch {self.step / self.steps_per_epoch:.2f}: val pretext accuracy {_percent(val_accuracy)}")
                        self.save_checkpoint()
                    elif self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.stopping:
                        if not end_of_epoch:
                            self.save_checkpoint()
                        self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "event": "stopped by SIGTERM"})
                        raise Preempted(
                            f"stopped by SIGTERM at step {self.step} of {self.total_steps}; checkpoint saved in "
                            f"{self.files.checkpoint}: continue with --resume"
                        )
        finally:
            bar.close()
        if not validated:
            val_accuracy = self.pretext_accuracy(self.splits.val)
        summary = {
            "status": "finished",
            "config_hash": self.config.config_hash(),
            "steps": self.step,
            "epochs": self.config.epochs,
            "val_pretext_accuracy_percent": val_accuracy,
            "val_pretext_scored": self.val_scored,
            "world_size": self.world_size,
            "global_batch_images": self.config.batch_size * self.world_size,
            "skipped_images": self.skipped,
            "skipped_val_images": self.skipped_val,
            "seconds_this_session": time.perf_counter() - started,
            "data": self.splits.describe(),
        }
        if self.rank == 0:
            try:
                atomic.write_json(self.files.summary, summary)
            except OSError as error:
                raise self._write_failed(error, self.files.summary) from None
        return summary


def train(
    config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True, force: bool = False
) -> dict[str, Any]:
    """Train (or resume) one pretext run in ``run_dir``; returns its summary."""
    return Trainer(config, run_dir, resume=resume, progress=progress, force=force).fit()
