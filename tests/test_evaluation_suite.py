"""The evaluation suite on a small pretrained network: every layer, every probe, few labels,
another downstream dataset, and the representation-size network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from forked_cli import ForkedCli
from pretextlab.config import TrainConfig
from pretextlab.evaluate.features import pooled_dim
from pretextlab.evaluate.probe_run import EvalConfig, evaluate_run
from pretextlab.training import Trainer, load_trained

SMALL_EVAL = dict(limit=600, test_limit=300, val_size=150, device="cpu", l2_grid=(1e-1, 1e-2, 1e-3))


def _pretrain(run: Path, **changes) -> Path:
    config = dict(
        task="rotation", network="resnet50v1", width=1, image_size=32, limit=640, val_size=64, test_limit=64,
        epochs=1, batch_size=32, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1,
        monitor_every=0,  # the kNN monitor is test_knn_monitor.py's
    )
    config.update(changes)
    Trainer(TrainConfig(**config), run, progress=False).fit()
    return run


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("suite") / "rot")


@pytest.mark.slow
def test_every_output_in_one_pass_with_the_study_pooling(pretrained):
    results = evaluate_run(pretrained, EvalConfig(outputs=("all",), **SMALL_EVAL), progress=False)
    _, network, task = load_trained(pretrained)
    with torch.no_grad():
        shapes = {k: v.shape[1:] for k, v in network(task.eval_views(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))[0]).items()}
    assert [r["output"] for r in results] == list(network.output_names)
    for record in results:
        assert record["feature_dim"] == pooled_dim(shapes[record["output"]]) <= 9000
        assert record["test_top1_percent"] > 40, record  # ten classes: chance is 10%
        stored_path = Path(record["result_file"])
        assert stored_path.parent == pretrained / "probes"
        assert stored_path.name.startswith(f"fashion-mnist-{record['output']}-lbfgs-all-")
        stored = json.loads(stored_path.read_text())
        assert stored["run_config_hash"] and stored["eval_config"]["limit"] == 600
        assert stored["train_images"] + stored["val_images"] == 600 and stored["test_images"] == 300
        assert "l2" in stored["chosen"] and stored["data"]


@pytest.mark.parametrize("probe", ["sgd", "mlp"])
def test_sgd_trained_probes_beat_chance_by_far_and_store_their_curve(pretrained, probe):
    config = EvalConfig(probe=probe, sgd_epochs=6, sgd_batch_size=64, **SMALL_EVAL)
    [record] = evaluate_run(pretrained, config, progress=False)
    assert record["probe"] == probe and record["test_top1_percent"] > 40
    assert [point["epoch"] for point in record["curve"]] == list(range(1, 7))
    # The study's 70-epoch schedule shortened to 6 epochs keeps its decays at 30/70 and 50/70 of the run.
    assert record["probe_config"]["epochs"] == 6
    assert list(record["probe_config"]["decay_epochs"]) == pytest.approx([6 * 30 / 70, 6 * 50 / 70], abs=1e-6)
    assert Path(record["result_file"]).name.startswith(f"fashion-mnist-pre_logits-{probe}-paper6-all-")
    assert Path(record["result_file"]).exists()


def test_few_labels_probe_exactly_the_balanced_subset(pretrained):
    [record] = evaluate_run(pretrained, EvalConfig(labels_per_class=5, **SMALL_EVAL), progress=False)
    assert record["train_images"] == 50 and record["labels"] == "5pc"
    assert record["test_top1_percent"] > 20
    assert Path(record["result_file"]).name.startswith("fashion-mnist-pre_logits-lbfgs-5pc-")


def _write_folder_dataset(root: Path, per_class: int) -> None:
    """Three classes of real PNG files that differ in structure: stripes, a square, a gradient."""
    rng = np.random.default_rng(1)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label, name in enumerate(("stripes", "square", "gradient")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (36, 36), dtype=np.uint8)
                if label == 0:
                    pixels[:, :: 4 + i % 3] += 180
                elif label == 1:
                    start = rng.integers(4, 14)
                    pixels[start : start + 14, start : start + 14] += 180
                else:
                    pixels += np.linspace(0, 180, 36, dtype=np.uint8)[None, :]
                Image.fromarray(pixels).convert("RGB").save(folder / f"{i}.png")


@pytest.mark.slow  # the command in a child process: ~1.5 CPU-s
def test_a_downstream_folder_dataset_independent_of_the_pretext_dataset(pretrained, tmp_path):
    """The `pretextlab evaluate` command in a real child process with its own stdout and stderr (forked
    from this one, torch imported: forked_cli.py), so stdout-is-only-JSON holds at the file descriptor;
    the interpreter start and `python -m pretextlab` entry itself are test_run_dir_faults.py's."""
    data = tmp_path / "places"
    _write_folder_dataset(data, per_class=40)
    child = ForkedCli(
        ["evaluate", "--run", str(pretrained), "--dataset", "folder", "--data-dir", str(data), "--val-size", "30",
         "--output", "block3", "pre_logits", "--device", "cpu", "--no-progress"],
    )
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr
    printed = json.loads(stdout)  # stdout is JSON only; people read stderr
    assert [r["output"] for r in printed["results"]] == ["block3", "pre_logits"]
    for output, result in zip(("block3", "pre_logits"), printed["results"]):
        assert Path(result["result_file"]).name.startswith(f"folder-places-{output}-lbfgs-all-")
        assert f"in {result['result_file']}" in stderr  # says where it stored each result
        stored = json.loads(Path(result["result_file"]).read_text())
        assert stored["dataset"] == "folder" and stored["task"] == "rotation"
        assert stored["train_images"] == 90 and stored["val_images"] == 30 and stored["test_images"] == 60
        assert stored["test_top1_percent"] == result["test_top1_percent"] > 60  # three classes: chance is 33%
        # 60 test images, 20 per class: flagged as too few to mean much, on stderr and in the JSON.
        assert any("only 60 test images" in w for w in stored["warnings"]) and "only 60 test images" in stderr
    assert "block3" in stderr and "pre_logits" in stderr


def test_a_representation_size_network_has_the_requested_pre_logits(tmp_path):
    run = _pretrain(tmp_path / "rep", representation_size=48, limit=200, epochs=0.5)
    _, network, _ = load_trained(run)
    assert network.out_dim == 48
    [record] = evaluate_run(run, EvalConfig(limit=300, test_limit=100, val_size=60, device="cpu"), progress=False)
    assert record["feature_dim"] == 48


@pytest.mark.parametrize("name", ["resnet50v1", "resnet50v2", "revnet50", "vgg19bn"])
@pytest.mark.parametrize("patch_mode", [False, True])
def test_the_pooling_rule_gives_every_output_of_every_network_its_expected_size(name, patch_mode):
    """At the study's input sizes (224 images, 64 px patches), each output is pooled to <= 9000
    values by kernel = stride = ceil(sqrt(h*w*c/9000)), and the extractor's features have exactly
    the size the rule predicts."""
    from pretextlab.evaluate.features import pool_to_budget
    from pretextlab.models import build_network

    size = 64 if patch_mode else 224
    network = build_network(name, width=1, patch_mode=patch_mode, input_size=size).eval()
    with torch.no_grad():
        outputs = network(torch.zeros(1, 3, size, size))
    assert list(outputs) == list(network.output_names)
    for output, value in outputs.items():
        shape = value.shape[1:]
        pooled = pool_to_budget(value)
        assert pooled.shape == (1, pooled_dim(shape)) and pooled.shape[1] <= 9000, (name, output, shape)
        if value.ndim == 4:
            c, h, w = shape
            k = int(np.ceil(np.sqrt(h * w * c / 9000))) if h * w * c > 9000 else 1
            assert pooled.shape[1] == c * (h // k) * (w // k), (name, output, shape, k)
