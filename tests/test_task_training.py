"""Every pretext task trains through the same trainer on real Fashion-MNIST, then its frozen network is probed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretextlab.config import TrainConfig
from pretextlab.evaluate.probe_run import EvalConfig, evaluate_run
from pretextlab.training import Trainer, read_metrics

# Test-sized settings: small patches/images, width 1; everything else is the task's study recipe.
TASKS = {
    # chance of the pretext accuracy: a copy's nearest neighbour is one of its 3 siblings among 63 others
    # Two epochs (32 steps): with one, the loss windows are too few and noisy for "the loss falls" (it
    # failed once under 2 intra-op threads although the pretext accuracy was far above its bar).
    "exemplar": (dict(image_size=32, batch_size=16, copies=4, crop_scale=(0.3, 1.0), epochs=2), 3 / 63),
    # The patch tasks at a batch of 8 take base_lr 1.6 (a peak of 0.05): at the study's 0.1 (0.003
    # after linear scaling) relative_patch barely left chance in 40 steps (15.8-20.7% pretext
    # accuracy over seeds 0-3 against the 16.25% bar: seed 3 failed). At 1.6, seeds 0-3 measured:
    # jigsaw 74-86% pretext / 59-66% probe, relative_patch 27-32% / 55-65% (bars 16.25% and 30%).
    "jigsaw": (dict(patch_size=16, batch_size=8, num_permutations=8, permutations_per_batch=8, epochs=2,
                    embedding_dim=128, head_hidden=256, base_lr=1.6), 1 / 8),
    "relative_patch": (dict(patch_size=16, batch_size=8, epochs=2, embedding_dim=128, head_hidden=256, base_lr=1.6), 1 / 8),
}


def _config(task: str, changes: dict) -> TrainConfig:
    return TrainConfig(
        task=task, network="resnet50v1", width=1, dataset="fashion-mnist", limit=320, val_size=64, test_limit=200,
        color_jitter=0.0, device="cpu", log_every=3, monitor_every=0, **changes,  # the kNN monitor: test_knn_monitor.py
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_trains_and_its_frozen_network_is_probed(task, tmp_path):
    changes, chance = TASKS[task]
    run = tmp_path / task
    summary = Trainer(_config(task, changes), run, progress=False).fit()
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    third = max(len(losses) // 3, 1)
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, losses
    # >= 512 scored validation samples: 1.3 x chance is several standard deviations above it.
    assert summary["val_pretext_accuracy_percent"] > 100 * 1.3 * chance, summary

    [result] = evaluate_run(run, EvalConfig(limit=400, test_limit=200, val_size=100, device="cpu", l2_grid=(1e-1, 1e-2, 1e-3)), progress=False)
    assert result["task"] == task and result["output"] == "pre_logits"
    assert result["test_top1_percent"] > 30  # ten classes: chance is 10%
    assert Path(result["result_file"]).exists()
