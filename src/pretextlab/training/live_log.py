"""What a training run logs as it goes: its windows' statistics, mirrored to TensorBoard (and W&B if asked).

metrics.jsonl stays the source of truth (run_dir.py); every record appended to it is mirrored here,
each numeric field as one scalar at the record's step. The event files live in RUN/tensorboard/
(``tensorboard --logdir RUN`` or the folder above several runs). They are append-only records with
a checksum each, so a kill mid-write leaves a torn tail that TensorBoard's reader skips. A resumed run
opens a new event file with ``purge_step`` = the checkpoint's step + 1: TensorBoard then drops the
scalars the killed session had logged after that checkpoint (trim_metrics drops the same lines from
metrics.jsonl), so no step appears twice. Rank 0 only (the trainer builds this on rank 0).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from pretextlab.errors import PretextlabError

TENSORBOARD_DIR = "tensorboard"
FLUSH_SECONDS = 10  # how stale a live dashboard may be (TensorBoard's default, 120 s, is not "live")
# Fields of a metrics record that are not scalars to plot.
_NOT_SCALARS = frozenset({"step", "epoch"})


T = TypeVar("T")


@dataclass
class Window:
    """Training statistics since the last metrics line."""

    loss: float = 0.0
    data_wait: float = 0.0  # seconds spent waiting for the loader's next batch
    right: int = 0
    scored: int = 0
    steps: int = 0
    started: float = 0.0

    def record(self, step: int, steps_per_epoch: int, lr: float, images_per_step: int) -> dict[str, Any]:
        """The metrics.jsonl line of this window, which ends at ``step``."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "step": step,
            "epoch": step / steps_per_epoch,
            "lr": lr,
            "loss": self.loss / self.steps,
            "pretext_accuracy_percent": 100.0 * self.right / self.scored if self.scored else None,
            "images_per_s": self.steps * images_per_step / elapsed,
            # The share of the window's wall time this rank waited for decoded batches (a starved device).
            "data_wait_percent": 100.0 * self.data_wait / elapsed,
        }


def timed(items: Iterable[T]) -> Iterator[tuple[T, float]]:
    """Each item with the seconds spent waiting for it."""
    iterator = iter(items)
    while True:
        started = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - started


def scalar_tag(name: str) -> str:
    """The TensorBoard tag of a metrics.jsonl field: grouped as train/, val/ or knn/ (the field name kept whole)."""
    if name.startswith("knn_"):
        return f"knn/{name}"
    if name.startswith(("val_", "skipped")):
        return f"val/{name}"
    return f"train/{name}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (None, text and booleans are not plotted)."""
    return {
        name: float(value) for name, value in record.items()
        if name not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def check_wandb(project: str | None) -> Any:
    """The wandb module when ``project`` is set (None otherwise); one clear error when it is not installed."""
    if project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise PretextlabError(
            f"--wandb {project}: the wandb package is not installed: pip install pretextlab[wandb] (or drop --wandb)"
        ) from None
    return wandb


def _wandb_run(project: str, run_dir: Path, config: dict[str, Any], resume: bool) -> Any:
    wandb = check_wandb(project)
    # One W&B run per run directory: a resumed session continues it (offline: another file of it).
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    where = os.environ.get("WANDB_DIR") or str(run_dir)
    try:
        return wandb.init(project=project, dir=where, name=run_dir.name, id=run_id, config=config,
                          resume="allow" if resume else None)
    except Exception as error:  # wandb raises its own error types (no login, no network, a bad project name)
        raise PretextlabError(
            f"--wandb {project}: Weights & Biases did not start ({error}); log in with `wandb login`, "
            "set WANDB_MODE=offline to sync later, or drop --wandb"
        ) from None


class LiveLog:
    """TensorBoard (always) and W&B (with a project) mirrors of metrics.jsonl for one session of a run."""

    def __init__(self, run_dir: Path, first_step: int, config: dict[str, Any], wandb_project: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.wandb = _wandb_run(wandb_project, run_dir, config, first_step > 0) if wandb_project else None
        self.writer = SummaryWriter(
            str(run_dir / TENSORBOARD_DIR), purge_step=first_step + 1 if first_step > 0 else None, flush_secs=FLUSH_SECONDS
        )

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        step = int(record["step"])
        for name, value in values.items():
            self.writer.add_scalar(scalar_tag(name), value, step)
        if self.wandb is not None and values:
            self.wandb.log({scalar_tag(name): value for name, value in values.items()}, step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
