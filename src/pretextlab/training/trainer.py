"""The pretext training loop: steps, logging, checkpoints at their times, exact resume, stopping.

The files live in run_dir.py and checkpoint.py, validation in validation.py, the SIGTERM handler
in preemption.py. Resuming restores weights, optimizer, step (so the schedule and the data position) and the RNG
state. Augmentation randomness is a pure function of (seed, step, rank), so a resumed run sees the
very same batches and crops as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from pretextlab import atomic
from pretextlab.config import TrainConfig, resolve
from pretextlab.data import BatchLoader, DatasetSplits, ImageSet, batches_per_epoch, load_dataset
from pretextlab.data.crops import with_resize
from pretextlab.errors import PretextlabError
from pretextlab.training.checkpoint import has_checkpoint, load_checkpoint, write_checkpoint
from pretextlab.training.distributed import all_reduce_sum, barrier, distributed_context
from pretextlab.training.knn_monitor import KnnMonitor, build_monitor, knn_text
from pretextlab.training.live_log import LiveLog, Window, check_wandb, timed
from pretextlab.training.model import PretextModel, place_model, resolve_device
from pretextlab.training.run_dir import (
    RunFiles,
    RunLock,
    append_metrics,
    check_out_dir,
    check_resumable,
    config_record,
    notice,
    start_run_dir,
    trim_metrics,
)
from pretextlab.training.preemption import Preempted, stop_on_sigterm
from pretextlab.training.schedule import learning_rate, step_seed
from pretextlab.training.validation import MIN_VAL_SCORED, pretext_score

def _percent(value: float | None) -> str:
    return "not scored" if value is None else f"{value:.2f}%"


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
        resume_hint: str = "continue with --resume",
    ) -> None:
        self.config = resolve(config)
        # How a stopped run is continued, for its messages: a study cell is continued by its study, not --resume.
        self.resume_hint = resume_hint
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
        self.live: LiveLog | None = None  # rank 0's TensorBoard / W&B mirror of metrics.jsonl, open during fit
        try:
            self._setup(resume, force, splits)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: bool, force: bool, splits: DatasetSplits | None) -> None:
        # Everything that can refuse the run is checked before the run directory is created or
        # written, so a failed start leaves nothing behind that the corrected command would trip on.
        record = self._check_run_dir(resume, force) if self.dist.is_main else None
        self.splits = splits or load_dataset(
            self.config.dataset, data_dir=self.config.data_dir, image_size=self.config.decode_size,
            val_size=self.config.val_size, limit=self.config.limit, test_limit=self.config.test_limit, seed=self.config.seed,
        )
        self._build()
        self.monitor: KnnMonitor | None = build_monitor(self.config, self.network, self.splits, self.device, self.dist.is_main)
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
            start_run_dir(self.files, self.lock, record)
        barrier(self.dist)
        if resume and has_checkpoint(self.files):
            self._load_checkpoint()
        if resume and self.dist.is_main:
            trim_metrics(self.files, self.step)

    def _build(self) -> None:
        placed = place_model(self.config, self.device, self.dist)
        self.network, self.task, self.model, self.compiled = placed.network, placed.task, placed.model, placed.compiled
        self.optimizer, self.dtype, self.channels_last = placed.optimizer, placed.dtype, placed.channels_last
        self.autocast_dtype = placed.autocast_dtype

    # -- run directory --------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool, force: bool) -> dict[str, Any]:
        """Refuse an unusable --out or a conflicting run; the config record to write once the run starts."""
        check_out_dir(self.files.root)
        check_wandb(self.config.wandb)
        if self.files.root.is_dir():
            self.lock.acquire()
        return check_resumable(self.files, config_record(self.config, self.world_size), resume, force)

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

    def _write_failed(self, error: OSError, path: Path) -> PretextlabError:
        code = errno.errorcode.get(error.errno or 0, "")
        kept = (
            f"the last checkpoint (step {self.saved_step}) is kept in {self.files.root}"
            if self.saved_step is not None else "no checkpoint had been saved yet"
        )
        return PretextlabError(
            f"could not write {path} at step {self.step}: {error.strerror or error}{f' ({code})' if code else ''}; "
            f"{kept}: free space (or fix the disk) and {self.resume_hint}"
        )

    def save_checkpoint(self) -> None:
        if self.live is not None:
            self.live.flush()  # the dashboards show what the checkpoint holds
        if self.rank == 0:
            try:
                write_checkpoint(self.files, self._checkpoint_state())
            except OSError as error:
                raise self._write_failed(error, self.files.checkpoint) from None
        self.saved_step = self.step

    def _load_checkpoint(self) -> None:
        state, identity = load_checkpoint(self.files.root, map_location=self.device)
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
        if self.rank == 0:
            try:
                append_metrics(self.files, record)
            except OSError as error:
                raise self._write_failed(error, self.files.metrics) from None
            if self.live is not None:
                self.live.log(record)

    # -- one step -------------------------------------------------------------------------------

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
        return iter(BatchLoader(
            self.splits.train, self.config.batch_size, shuffle=True, seed=self.config.seed, epoch=epoch,
            start_batch=start, drop_last=True, workers=self.config.workers, pin_memory=self.device.type == "cuda",
            rank=self.rank, world_size=self.world_size,
            # issue 16: crops cut while decoding (data/crops.py), resized as the run's config says
            plan=with_resize(self.task.decode_plan(True), self.config.crop_resize),
        ))

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

    def pretext_accuracy(self, images: ImageSet) -> float | None:
        """Pretext accuracy (%) of the current weights on ``images`` (the validation split), None
        when nothing could be scored (e.g. a validation split of one image)."""
        self.network.eval()
        self.task.eval()
        score = pretext_score(
            self.task, lambda inputs, context: self._forward(inputs, context, train=False), images, self.config,
            lambda index: self._generator(index, purpose=1), self.device, self.dist,
        )
        self.skipped_val, self.val_scored = score.skipped, score.scored
        if score.scored and score.scored < MIN_VAL_SCORED and not self.warned_val and self.rank == 0:
            self.warned_val = True
            notice(
                f"warning: the validation pretext accuracy is over only {score.scored} scored samples (under "
                f"{MIN_VAL_SCORED}), so it is noisy: raise --val-size or --val-batches for a firmer number"
            )
        return score.accuracy_percent

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        try:
            if self.files.summary.exists() and self.step >= self.total_steps:
                return json.loads(self.files.summary.read_text())
            if self.rank == 0:
                self.live = LiveLog(self.files.root, self.step, self.config.to_dict(), self.config.wandb)
            with stop_on_sigterm(self._request_stop):
                return self._fit()
        finally:
            if self.live is not None:
                self.live.close()
                self.live = None
            self.lock.release()

    def _fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=f"{self.config.task}/{self.config.network}", unit="step",
            disable=not self.progress or self.rank != 0, dynamic_ncols=True,
        )
        window = Window(started=time.perf_counter())
        val_accuracy: float | None = None
        validated = False
        try:
            while self.step < self.total_steps:
                for batch, waited in timed(self._epoch_batches()):
                    if self.step >= self.total_steps:
                        break
                    window.data_wait += waited
                    self._step_on(batch, window)
                    bar.update(1)
                    if window.steps and (self.step % self.config.log_every == 0 or self.step == self.total_steps):
                        window = self._log_window(window, bar)
                    end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    if end_of_epoch:
                        val_accuracy, validated = self._end_epoch(), True
                    elif self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.config.monitor_every and self.step % self.config.monitor_every == 0:
                        self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **self._monitor()})
                    if self.stopping:
                        self._stop(checkpointed=end_of_epoch)
        finally:
            bar.close()
        if not validated:
            val_accuracy = self.pretext_accuracy(self.splits.val)
        return self._finish(val_accuracy, time.perf_counter() - started)

    def _step_on(self, batch: Any, window: Window) -> None:
        self.skipped += batch.skipped
        if len(batch.labels) >= 2:
            loss, right, scored = self.train_step(batch.images)
            window.loss, window.right, window.scored = window.loss + loss, window.right + right, window.scored + scored
            window.steps += 1
        # else: (almost) every image of this batch was unreadable; BatchNorm cannot train on it, but
        # the step still counts so step numbers stay equal to batch positions.
        self.step += 1

    def _log_window(self, window: Window, bar: Any) -> Window:
        lr = learning_rate(self.config, self.step - 1, self.steps_per_epoch, self.world_size)
        record = window.record(self.step, self.steps_per_epoch, lr, self.config.batch_size * self.world_size)
        self._log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=_percent(record["pretext_accuracy_percent"]), lr=f"{lr:.3g}")
        return Window(started=time.perf_counter())

    def _end_epoch(self) -> float | None:
        """Validate, log and checkpoint at the end of an epoch (or of the run)."""
        val_accuracy = self.pretext_accuracy(self.splits.val)
        monitored = self._monitor() if self.config.monitor_every is None else {}
        self._log({
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "val_pretext_accuracy_percent": val_accuracy,
            "val_pretext_scored": self.val_scored,
            "skipped_images": self.skipped,
            "skipped_val_images": self.skipped_val,
            **monitored,
        })
        if self.rank == 0:
            # stderr, beside the progress bar: stdout carries the JSON summary only
            notice(f"epoch {self.step / self.steps_per_epoch:.2f}: val pretext accuracy {_percent(val_accuracy)}{knn_text(monitored)}")
        self.save_checkpoint()
        return val_accuracy

    def _monitor(self) -> dict[str, float]:
        """The kNN monitor's fields (rank 0; {} on the others): frozen features, no gradient, no random draw."""
        return {} if self.monitor is None else self.monitor.measure(self.network, self.task.eval_views, self.dtype)

    def _request_stop(self, signum: int) -> None:
        self.stop_requested = signum

    def _stop(self, checkpointed: bool) -> None:
        if not checkpointed:
            self.save_checkpoint()
        self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "event": "stopped by SIGTERM"})
        raise Preempted(
            f"stopped by SIGTERM at step {self.step} of {self.total_steps}; checkpoint saved in "
            f"{self.files.checkpoint}: {self.resume_hint}"
        )

    def _finish(self, val_accuracy: float | None, seconds: float) -> dict[str, Any]:
        summary = {
            "status": "finished", "config_hash": self.config.config_hash(), "steps": self.step, "epochs": self.config.epochs,
            "val_pretext_accuracy_percent": val_accuracy, "val_pretext_scored": self.val_scored,
            "world_size": self.world_size, "global_batch_images": self.config.batch_size * self.world_size,
            "skipped_images": self.skipped, "skipped_val_images": self.skipped_val,
            "seconds_this_session": seconds, "data": self.splits.describe(),
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
