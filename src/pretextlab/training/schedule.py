"""The study's learning-rate schedule and the per-step seeds that make a resumed run see the same batches."""

from __future__ import annotations

import numpy as np

from pretextlab.config import TrainConfig


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
