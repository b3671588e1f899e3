"""Pretext training: the run directory, the schedule, the model a config describes, the loop, DDP."""

from pretextlab.training.checkpoint import CheckpointIdentity, checkpoint_identity
from pretextlab.training.model import (
    PretextModel,
    build_model,
    load_trained,
    load_trained_identity,
    optimizer_for,
    resolve_device,
)
from pretextlab.training.run_dir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    RUN_FORMAT_VERSION,
    SUMMARY_FILE,
    RunFiles,
    load_config,
    read_metrics,
)
from pretextlab.training.preemption import Preempted
from pretextlab.training.schedule import learning_rate, step_seed
from pretextlab.training.trainer import Trainer, train

__all__ = [
    "CHECKPOINT_FILE", "CONFIG_FILE", "LOCK_FILE", "METRICS_FILE", "PREVIOUS_CHECKPOINT_FILE", "RUN_FORMAT_VERSION",
    "SUMMARY_FILE", "CheckpointIdentity", "Preempted", "PretextModel", "RunFiles", "Trainer", "build_model",
    "checkpoint_identity", "learning_rate", "load_config", "load_trained", "load_trained_identity", "optimizer_for",
    "read_metrics", "resolve_device", "step_seed", "train",
]
