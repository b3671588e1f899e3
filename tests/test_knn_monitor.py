"""The kNN monitor (issue 17 item 2): the weighted kNN classifier, its rows in metrics.jsonl, and that
watching a run does not change it (weights and an exact resume with the monitor on)."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.training import Preempted, Trainer, read_metrics
from pretextlab.training.knn_monitor import KNN_KS, knn_field, weighted_knn_top1

# 32 training images in batches of 16: two steps an epoch, the fewest that leave a step mid-epoch.
TINY = dict(task="rotation", network="resnet50v1", width=1, image_size=16, limit=64, val_size=32, test_limit=32,
            epochs=2, batch_size=16, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1, log_every=2)


def _reference_top1(bank, bank_labels, queries, query_labels, num_classes, k, temperature):
    """Wu et al. 2018's weighted vote, one query at a time in float64 Python arithmetic."""
    right = 0
    for query, truth in zip(queries, query_labels):
        sims = [float(np.dot(query, b) / (np.linalg.norm(query) * np.linalg.norm(b))) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[bank_labels[i]] += math.exp(sims[i] / temperature)
        right += int(max(range(num_classes), key=lambda c: (votes[c], -c)) == truth)
    return 100.0 * right / len(queries)


def test_weighted_knn_equals_a_float64_brute_force_reference():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(70, 6)), rng.normal(size=(40, 6))
    bank_labels, query_labels = rng.integers(0, 4, 70), rng.integers(0, 4, 40)
    ks = (1, 5, 20, 200)  # 200 > the bank's 70: the whole bank votes
    got = weighted_knn_top1(torch.from_numpy(bank), torch.from_numpy(bank_labels), torch.from_numpy(queries),
                            torch.from_numpy(query_labels), 4, ks=ks)
    # Exact: both count the same right answers (random float64 data has no tied similarities or votes).
    assert got == {k: _reference_top1(bank, bank_labels, queries, query_labels, 4, k, 0.07) for k in ks}
    assert KNN_KS == (20, 200)


def test_the_vote_is_weighted_by_similarity_not_a_majority():
    # Two close neighbours of class 0 outvote three farther ones of class 1 at T = 0.07.
    bank = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.6, 0.8], [0.6, -0.8], [0.5, 0.85]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert weighted_knn_top1(bank, labels, query, torch.tensor([0]), 2, ks=(5,)) == {5: 100.0}
    assert weighted_knn_top1(bank, labels, query, torch.tensor([1]), 2, ks=(5,), temperature=100.0) == {5: 100.0}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return {f"{part}.{name}": value for part in ("network", "task") for name, value in state[part].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("monitor")
    made = {}
    for name, extra in (("on", {"monitor_outputs": ("pre_logits", "block3")}), ("off", {"monitor_every": 0})):
        made[name] = root / name
        Trainer(TrainConfig(**TINY, **extra), made[name], progress=False).fit()
    # The same run as "on", stopped by SIGTERM's path after its first step (mid-epoch), then resumed.
    made["resumed"] = root / "resumed"
    config = TrainConfig(**TINY, monitor_outputs=("pre_logits", "block3"))
    first = Trainer(config, made["resumed"], progress=False)
    first.stop_requested = signal.SIGTERM  # what the SIGTERM handler sets; all ranks agree at the next step
    with pytest.raises(Preempted):
        first.fit()
    Trainer(config, made["resumed"], resume=True, progress=False).fit()
    return made


@pytest.mark.slow  # three tiny runs (16 px, 2 steps an epoch): ~2 CPU-s
def test_the_monitor_logs_each_epoch_and_leaves_the_run_as_it_would_be_without_it(runs):
    epochs = [m for m in read_metrics(runs["on"]) if "val_pretext_accuracy_percent" in m]
    assert [m["epoch"] for m in epochs] == [1.0, 2.0]
    fields = [knn_field(output, k) for output in ("pre_logits", "block3") for k in KNN_KS]
    for record in epochs:
        assert all(0.0 <= record[f] <= 100.0 for f in fields), record
    assert not any(f.startswith("knn_") for m in read_metrics(runs["off"]) for f in m)
    # Eval mode, no gradient, no random draw: bit-identical weights and BatchNorm statistics (the same
    # float32 operations in the same order, so equality does not depend on the CPU).
    on, off, resumed = _weights(runs["on"]), _weights(runs["off"]), _weights(runs["resumed"])
    assert any("running_mean" in name for name in on)
    assert all(torch.equal(on[name], off[name]) for name in on)
    rng = [torch.load(runs[name] / "checkpoint.pt", weights_only=True)["torch_rng"] for name in ("on", "off")]
    assert torch.equal(*rng)  # the global stream (which dropout or a plug-in task may use) is untouched too
    # An exact resume with the monitor on: the same weights and the same monitor rows, each step once.
    assert all(torch.equal(on[name], resumed[name]) for name in on)
    again = [m for m in read_metrics(runs["resumed"]) if "val_pretext_accuracy_percent" in m]
    assert [{f: m[f] for f in fields} for m in again] == [{f: m[f] for f in fields} for m in epochs]


def test_monitor_every_n_steps_and_a_wrong_output_is_one_clear_error(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1}, monitor_every=2)
    Trainer(config, tmp_path / "every", progress=False).fit()
    steps = [m["step"] for m in read_metrics(tmp_path / "every") if knn_field("pre_logits", 20) in m]
    assert steps == [2]  # 32 training images in batches of 16: two steps, measured at step 2 only
    with pytest.raises(PretextlabError, match=r"--monitor-outputs .*no output fc9.*choose from .*pre_logits"):
        Trainer(TrainConfig(**TINY, monitor_outputs=("fc9",)), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "config.json").exists()
    with pytest.raises(PretextlabError, match="--monitor-every must be >= 0"):
        Trainer(TrainConfig(**TINY, monitor_every=-1), tmp_path / "bad2", progress=False)


def _knn_records(epochs: int, start: float) -> list[dict]:
    return [{"step": 10 * e, "epoch": float(e), "val_pretext_accuracy_percent": 50.0 + e,
             knn_field("pre_logits", 20): start + e, knn_field("block3", 20): start + 2 * e, knn_field("pre_logits", 200): start}
            for e in range(1, epochs + 1)]


def test_the_monitor_is_drawn_in_the_report_and_the_demo_figures(tmp_path):
    from PIL import Image

    from pretextlab.demo import plot_training_curve
    from pretextlab.report.data import StudyData
    from pretextlab.report.curves import figure_pretext_training
    from pretextlab.study.store import ResultsStore

    with ResultsStore(tmp_path / "results.sqlite") as store:
        for config_hash, task in (("a" * 12, "rotation"), ("b" * 12, "exemplar")):
            store.register_run(config_hash, task=task, network="resnet50v1", width=1, representation_size=None,
                               config={"task": task}, run_dir=str(tmp_path / config_hash), plan=[])
            store.add_curve_points(config_hash, _knn_records(3, 20.0))
        data = StudyData.load(store)
    result = figure_pretext_training(data, tmp_path / "curves.png")
    knn_panels = [i for i, ax in enumerate(result.checks["axes"]) if ax["ylabel"].startswith("kNN top-1")]
    assert len(knn_panels) == 2 and "kNN monitor" in result.checks["title"]
    # Each run drawn in its task's kNN panel, once per monitored output (k=20 only).
    drawn = sorted((d["run"], d["panel"]) for d in result.checks["runs"] if d["panel"] in knn_panels)
    assert drawn == [("a" * 12, knn_panels[0])] * 2 + [("b" * 12, knn_panels[1])] * 2
    # The demo's curve gains a third panel (15 in wide at 110 dpi, not 10) when the run has monitor rows.
    with Image.open(plot_training_curve(_knn_records(2, 30.0), tmp_path / "demo.png", "t")) as image:
        assert image.size[0] == 15 * 110
