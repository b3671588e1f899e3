"""Stored probe results: keyed by the checkpoint they came from and by every setting that changes
them, flagged when scored on too few images, and the probes' progress bars name the layer
(issue 14, items 1, 3 and 9, and its output section)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pretextlab.config import TrainConfig
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.lbfgs import LbfgsConfig, lbfgs_probe
from pretextlab.evaluate.probe_run import EvalConfig, evaluate_run, scoring_warnings
from pretextlab.evaluate.sgd import SgdConfig, sgd_probe
from pretextlab.training import Trainer

TRAIN = dict(
    task="rotation", network="resnet50v1", width=1, image_size=32, limit=320, val_size=32, test_limit=32,
    epochs=0.5, batch_size=32, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1,
    monitor_every=0,  # the kNN monitor is test_knn_monitor.py's
)
SMALL_EVAL = dict(limit=300, test_limit=200, val_size=100, device="cpu", l2_grid=(1e-2,))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("results") / "rot"
    Trainer(TrainConfig(**TRAIN), run_dir, progress=False).fit()
    return run_dir


@pytest.mark.slow  # five evaluations: ~5 s
def test_every_setting_that_changes_a_result_keeps_its_own_file(run):
    messages: list[str] = []
    base = evaluate_run(run, EvalConfig(**SMALL_EVAL), progress=False, log=messages.append)[0]
    other_seed = evaluate_run(run, EvalConfig(**{**SMALL_EVAL, "seed": 1}), progress=False, log=messages.append)[0]
    other_limit = evaluate_run(run, EvalConfig(**{**SMALL_EVAL, "limit": 250}), progress=False, log=messages.append)[0]
    other_test = evaluate_run(run, EvalConfig(**{**SMALL_EVAL, "test_limit": 150}), progress=False, log=messages.append)[0]
    files = [Path(r["result_file"]) for r in (base, other_seed, other_limit, other_test)]
    assert len(set(files)) == 4 and all(f.exists() for f in files)  # none overwrote another
    stored = [json.loads(f.read_text()) for f in files]
    assert [s["eval_config"]["seed"] for s in stored] == [0, 1, 0, 0]
    assert [s["eval_config"]["limit"] for s in stored] == [300, 300, 250, 300]
    assert [s["test_images"] for s in stored] == [200, 200, 200, 150]
    # The same recipe again lands in the same file (a repeat replaces, it does not pile up).
    again = evaluate_run(run, EvalConfig(**SMALL_EVAL), progress=False, log=messages.append)[0]
    assert again["result_file"] == base["result_file"]
    assert all(f"in {f}" in "\n".join(messages) for f in files)  # each says where it was stored


class _CrashingTrainer(Trainer):
    """Dies (an exception, as a killed job would stop) before step ``crash_at``: the run is left
    with its last periodic checkpoint, unfinished. Stopping runs (signals) is test_faults.py's."""

    crash_at = 4

    def train_step(self, images):
        if self.step == self.crash_at:
            raise RuntimeError("the job died")
        return super().train_step(images)


def _unfinished_config() -> TrainConfig:
    # 96 training images in batches of 16: 6 steps, checkpoints at 2 and 4, the crash before step 5.
    return TrainConfig(**{**TRAIN, "limit": 128, "epochs": 1, "batch_size": 16, "checkpoint_every": 2})


@pytest.mark.slow  # a run stopped mid-way and its resume, each probed: ~3 CPU-s
def test_a_run_trained_further_is_probed_afresh_and_results_name_their_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the job died"):
        _CrashingTrainer(_unfinished_config(), run, progress=False).fit()
    assert not (run / "summary.json").exists()

    messages: list[str] = []
    first = evaluate_run(run, EvalConfig(**SMALL_EVAL), progress=False, log=messages.append)[0]
    assert first["checkpoint"]["finished"] is False
    assert any("has not finished training" in m and f"step {first['checkpoint']['step']}" in m for m in messages)
    caches = {d.name for d in (run / "features").iterdir()}

    Trainer(_unfinished_config(), run, resume=True, progress=False).fit()  # the same recipe, continued to its end
    messages.clear()
    second = evaluate_run(run, EvalConfig(**SMALL_EVAL), progress=False, log=messages.append)[0]
    assert second["checkpoint"]["finished"] is True and not any("not finished" in m for m in messages)
    assert second["checkpoint"]["step"] > first["checkpoint"]["step"]
    assert second["checkpoint"]["sha256"] != first["checkpoint"]["sha256"]
    # The features were extracted again from the final weights (a new cache), not reused.
    assert len({d.name for d in (run / "features").iterdir()} - caches) == 1
    assert second["result_file"] != first["result_file"]
    assert json.loads(Path(second["result_file"]).read_text())["checkpoint"] == second["checkpoint"]
    assert json.loads(Path(first["result_file"]).read_text())["checkpoint"] == first["checkpoint"]


def test_accuracies_on_too_few_images_are_flagged(run):
    messages: list[str] = []
    [record] = evaluate_run(run, EvalConfig(**{**SMALL_EVAL, "test_limit": 40}), progress=False, log=messages.append)
    assert any("only 40 test images" in w and "not meaningful" in w for w in record["warnings"])
    assert any("only 40 test images" in m for m in messages)
    assert json.loads(Path(record["result_file"]).read_text())["warnings"] == record["warnings"]


def test_the_minimum_counts_for_a_meaningful_accuracy():
    balanced = np.repeat(np.arange(10), 10)  # 100 images, 10 per class: enough
    assert scoring_warnings("test", balanced, 10) == []
    [one] = scoring_warnings("test", balanced[:99], 10)
    assert "only 99 test images" in one and "only 9" in one and "--test-limit" in one
    [skewed] = scoring_warnings("val", np.concatenate([np.zeros(200, dtype=np.int64), np.arange(1, 10)]), 10)
    assert "a class with only 1 val images" in skewed and "--val-size" in skewed


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    return (rng.normal(size=(n, 5)) + labels[:, None]).astype(np.float32), labels


def test_probe_progress_bars_name_the_layer_and_show_percent(capfd):
    train, val, test = _blobs(120, 0), _blobs(60, 1), _blobs(60, 2)
    lbfgs = lbfgs_probe(ProbeData(train, val, test, 3), LbfgsConfig(l2_grid=(1e-2,), device="cpu"), progress=True, label="block3")
    sgd_probe(ProbeData(train, val, test, 3), SgdConfig.paper("linear", device="cpu").scaled(1), progress=True, label="block3")
    err = capfd.readouterr().err
    assert "L-BFGS probe block3" in err and "SGD probe (linear) block3" in err
    assert f"val={lbfgs.val_top1_percent:.2f}%" in err


def test_every_evaluate_flag_sets_its_eval_config_field():
    # Issue 15: the evaluate command reads EvalConfig through its own field list (options.from_arguments),
    # so each flag must land in the field of its name, with its value, and no flag may go unread.
    import dataclasses

    from pretextlab.cli import _eval_config, build_parser

    argv = ["evaluate", "--run", "r", "--output", "block3", "pre_logits", "--probe", "mlp", "--sgd-schedule", "paper_long",
            "--sgd-preset", "paper", "--sgd-epochs", "3", "--sgd-batch-size", "64", "--sgd-base-lr", "0.5",
            "--dataset", "folder", "--data-dir", "d", "--val-size", "0.2", "--limit", "40", "--test-limit", "30",
            "--labels-per-class", "2", "--batch-size", "8", "--workers", "2", "--device", "cpu", "--seed", "7"]
    args = build_parser().parse_args(argv)
    config = _eval_config(args)
    expected = EvalConfig(
        outputs=("block3", "pre_logits"), probe="mlp", sgd_schedule="paper_long", sgd_preset="paper", sgd_epochs=3,
        sgd_batch_size=64, sgd_base_lr=0.5, dataset="folder", data_dir="d", val_size=0.2, limit=40, test_limit=30,
        labels_per_class=2, batch_size=8, workers=2, device="cpu", seed=7,
    )
    assert config == expected
    from pretextlab.evaluate.backbones import BackboneSpec

    # --backbone and its flags are BackboneSpec's fields, read the same way (issue 17 item 4).
    fields = {f.name for f in dataclasses.fields(EvalConfig)} | {f.name for f in dataclasses.fields(BackboneSpec)}
    unread = set(vars(args)) - fields - {"run", "no_progress", "func", "command"}
    assert not unread, f"evaluate flags that reach no EvalConfig field: {unread}"
    assert _eval_config(build_parser().parse_args(["evaluate", "--run", "r"])) == EvalConfig()
