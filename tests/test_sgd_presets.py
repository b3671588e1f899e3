"""The SGD probe's two recipes (issue 16 item 7): 'paper' (the released linear_eval: features
recomputed by the frozen network from random crops every epoch, raw, whole training split, scored
on the test split) and 'precomputed' (cached central-crop features, standardised, train minus the
held-out split). Real Fashion-MNIST images, a small real network, real files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from pretextlab.cli import build_parser
from pretextlab.data import load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.augmented import augmented_sgd_probe, augmented_views, frozen_features, random_crops, whole_training_split
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.probe_run import EvalConfig, probe_representation
from pretextlab.evaluate.sgd import SgdConfig, sgd_probe
from pretextlab.tasks.rotation import RotationOptions, RotationTask

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RAW_OFFSET = 5.0  # added to every feature: standardisation would remove it, raw features keep it


class TinyNet(nn.Module):
    """A small frozen network with two named outputs; BatchNorm so that eval mode matters."""

    output_names = ("block1", "pre_logits")

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        block1 = torch.relu(self.bn(self.conv(x))) + RAW_OFFSET
        return {"block1": block1, "pre_logits": block1.mean(dim=(2, 3))}


@pytest.fixture(scope="module")
def splits():
    # Decoded at 28 px; the task's input is 24 px, so a crop can sit at 5 x 5 places.
    return load_dataset("fashion-mnist", data_dir=FASHION_MNIST, image_size=28, limit=200, val_size=40, test_limit=100, download=False)


def _task() -> RotationTask:
    return RotationTask(4, RotationOptions(image_size=24))


def _tiny(schedule_epochs: int = 2, **overrides) -> SgdConfig:
    config = SgdConfig.preset("paper", "linear", device="cpu", batch_size=64, **overrides)
    return config.scaled(schedule_epochs)


def test_each_preset_resolves_to_the_recipe_it_names():
    paper = EvalConfig(probe="sgd", sgd_preset="paper").probe_config()
    assert (paper.features, paper.standardize, paper.train_split) == ("augmented", False, "whole")
    # The released schedule (config/evaluation/rotation_or_exemplar.sh:28,36-39), no weight decay.
    assert (paper.epochs, paper.batch_size, paper.base_lr, paper.decay_epochs, paper.weight_decay) == (70, 512, 0.1, (30, 50), 0.0)
    long = EvalConfig(probe="mlp", sgd_preset="paper", sgd_schedule="paper_long").probe_config()
    assert (long.kind, long.features, long.epochs, long.batch_size, long.decay_epochs) == ("mlp", "augmented", 520, 2048, (480, 500))
    fast = EvalConfig(probe="sgd", sgd_preset="precomputed").probe_config()
    assert (fast.features, fast.standardize, fast.train_split) == ("precomputed", True, "train")
    assert (fast.epochs, fast.batch_size, fast.decay_epochs) == (70, 512, (30, 50))
    assert paper.preset_name == "paper" and fast.preset_name == "precomputed"
    # Unset: the released recipe for folder datasets (ImageNet, Places205), the fast one for Fashion-MNIST.
    assert EvalConfig(probe="sgd", dataset="folder").resolved_sgd_preset() == "paper"
    assert EvalConfig(probe="sgd", dataset="fashion-mnist").resolved_sgd_preset() == "precomputed"
    # The recipe record names the preset, so the two never share a result file (its name ends in the recipe's hash).
    recipes = [EvalConfig(probe="sgd", sgd_preset=p).recipe() for p in ("paper", "precomputed")]
    assert [r["sgd_preset"] for r in recipes] == ["paper", "precomputed"]
    assert recipes[0]["probe_config"]["features"] == "augmented" and recipes[1]["probe_config"]["features"] == "precomputed"
    assert recipes[0] != recipes[1]
    assert "sgd_preset" not in EvalConfig(probe="lbfgs").recipe()
    assert EvalConfig(probe="sgd", sgd_preset="paper").probe_tag() != EvalConfig(probe="sgd", sgd_preset="precomputed").probe_tag()
    args = build_parser().parse_args(["evaluate", "--run", "r", "--probe", "sgd", "--sgd-preset", "paper"])
    assert args.sgd_preset == "paper"
    with pytest.raises(PretextlabError, match="--sgd-preset"):
        EvalConfig(probe="sgd", sgd_preset="fast").probe_config()
    with pytest.raises(PretextlabError, match="standardize=False"):
        SgdConfig(features="augmented")  # recomputed features have no fixed moments to standardise with
    with pytest.raises(PretextlabError, match="needs the network"):
        sgd_probe(ProbeData((np.zeros((4, 2)), np.array([0, 1, 0, 1])), (np.zeros((2, 2)), np.array([0, 1])),
                            (np.zeros((2, 2)), np.array([0, 1])), 2), _tiny(), progress=False)


def test_random_crops_are_true_crops_at_varying_places(splits):
    images, _ = splits.train.take(np.arange(64))
    crops = random_crops(images, 24, torch.Generator().manual_seed(3))
    assert crops.shape == (64, 3, 24, 24) and crops.dtype == torch.uint8
    places = set()
    for image, crop in zip(images, crops):
        matches = [(y, x) for y in range(5) for x in range(5) if torch.equal(image[:, y : y + 24, x : x + 24], crop)]
        assert matches  # every crop is a window of its own image
        places.add(matches[0])
    assert len(places) > 5  # not one fixed (central) window


def _central(network, task, images) -> dict[str, np.ndarray]:
    batch, _ = images.take(np.arange(len(images)))
    inputs, views = task.eval_views(batch)
    network.eval()
    return {o: v.numpy() for o, v in frozen_features(network, inputs, views, network.output_names).items()}


def test_paper_preset_recomputes_raw_features_from_new_crops_every_epoch_with_the_network_frozen(splits):
    network, task = TinyNet(), _task()
    val = {o: (f, splits.val.labels) for o, f in _central(network, task, splits.val).items()}
    test = {o: (f, splits.test.labels) for o, f in _central(network, task, splits.test).items()}
    network.train()  # the probe must switch it to eval mode (running BatchNorm statistics) itself
    before = {k: v.clone() for k, v in network.state_dict().items()}
    seen: list[tuple[bool, torch.Tensor]] = []
    head_inputs: list[torch.Tensor] = []

    def network_input(module, args):
        seen.append((module.training, args[0].detach().clone()))

    def linear_input(module, args):
        if isinstance(module, nn.Linear) and module.out_features == 10 and torch.is_grad_enabled():
            head_inputs.append(args[0].detach().clone())

    handles = [network.register_forward_pre_hook(network_input), nn.modules.module.register_module_forward_pre_hook(linear_input)]
    try:
        # One step per epoch over all 200 images (batch 200): each epoch sees every image once.
        results = augmented_sgd_probe(
            network, lambda x, g: augmented_views(task, x, g), whole_training_split(splits.train, splits.val),
            val, test, ["block1", "pre_logits"], 10, dataclasses.replace(_tiny(), batch_size=200), progress=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 2 and not any(training for training, _ in seen)  # frozen: eval-mode BatchNorm
    assert network.training  # its mode is given back
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # no weight or statistic moved
    first, second = (inputs for _, inputs in seen)
    assert first.shape == (200, 3, 24, 24)
    # Re-augmented: as a set of input images, epoch 2 is not epoch 1 reshuffled.
    rows = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert rows(first) != rows(second)
    # Raw: the heads read exactly the frozen network's pooled features of those inputs (no
    # standardisation, which would have removed RAW_OFFSET). Same computation, float32 roundoff bound.
    by_dim = {t.shape[1]: t for t in head_inputs[:2]}
    expected = frozen_features(network.eval(), first, 1, ["block1", "pre_logits"])
    for output, values in expected.items():
        assert torch.allclose(by_dim[values.shape[1]], values, rtol=1e-6, atol=1e-5)
    assert float(expected["pre_logits"].mean()) > RAW_OFFSET - 1
    for output, result in results.items():
        assert [e["epoch"] for e in result.curve] == [1, 2] and result.train_size == 200
        assert 0 < result.test_top1_percent <= 100


def test_paper_preset_trains_on_the_whole_training_split_and_names_its_recipe(splits, tmp_path):
    network, task = TinyNet(), _task()
    records = {}
    for preset in ("paper", "precomputed"):
        config = EvalConfig(outputs=("pre_logits",), probe="sgd", sgd_preset=preset, sgd_epochs=2, sgd_batch_size=64, device="cpu")
        records[preset] = probe_representation(
            network, task.eval_views, splits, ("pre_logits",), tmp_path / "features", "key", config, progress=False,
            probe_checkpoint_dir=tmp_path / "ckpt", train_views=lambda x, g: augmented_views(task, x, g),
        )["pre_logits"]
    paper, fast = records["paper"], records["precomputed"]
    assert paper["train_images"] == len(splits.train) + len(splits.val) == 200  # nothing held out
    assert fast["train_images"] == len(splits.train) == 160
    assert (paper["val_split"], paper["val_images"]) == ("test", len(splits.test))  # followed on the official test split
    assert (fast["val_split"], fast["val_images"]) == ("val", len(splits.val))
    assert (paper["sgd_preset"], paper["train_split"], paper["probe_config"]["features"]) == ("paper", "whole", "augmented")
    assert paper["probe_config"]["standardize"] is False
    assert (fast["sgd_preset"], fast["train_split"], fast["probe_config"]["features"]) == ("precomputed", "train", "precomputed")
    json.dumps(paper)  # storable as it is
    # The paper preset never extracted training features: only the test split is cached.
    cached = {p.name for p in (tmp_path / "features" / "key").iterdir()}
    assert "trainval" not in cached and {"test", "train", "val"} <= cached
    with pytest.raises(PretextlabError, match="train_views"):
        probe_representation(network, task.eval_views, splits, ("pre_logits",), tmp_path / "features", "key",
                             EvalConfig(probe="sgd", sgd_preset="paper", device="cpu"), progress=False)


def test_paper_preset_resumes_from_its_epoch_checkpoint_as_if_never_stopped(splits, tmp_path):
    network, task = TinyNet(), _task()
    images = whole_training_split(splits.train, splits.val)
    val = {o: (f, splits.test.labels) for o, f in _central(network, task, splits.test).items()}
    config = _tiny(3)  # 200 images at batch 64: 3 steps per epoch
    views = lambda x, g: augmented_views(task, x, g)  # noqa: E731
    whole = augmented_sgd_probe(network, views, images, val, val, ["pre_logits"], 10, config, progress=False)["pre_logits"]
    calls = []

    def stop_in_epoch_two(module, args):
        calls.append(1)
        if len(calls) == 5:  # the second step of epoch 2: its checkpoint holds epoch 1 only
            raise KeyboardInterrupt

    checkpoint = tmp_path / "probe.pt"
    handle = network.register_forward_pre_hook(stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        augmented_sgd_probe(network, views, images, val, val, ["pre_logits"], 10, config, checkpoint_path=checkpoint, progress=False)
    handle.remove()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    resumed = augmented_sgd_probe(network, views, images, val, val, ["pre_logits"], 10, config, checkpoint_path=checkpoint, progress=False)
    resumed = resumed["pre_logits"]
    assert [e["epoch"] for e in resumed.curve] == [1, 2, 3]
    # The same crops, order and updates in the same process: the same numbers.
    assert resumed.curve == whole.curve and resumed.test_top1_percent == whole.test_top1_percent
    with pytest.raises(PretextlabError, match="another configuration"):
        augmented_sgd_probe(network, views, images, val, val, ["pre_logits"], 10, dataclasses.replace(config, seed=4),
                            checkpoint_path=checkpoint, progress=False)


def test_patch_tasks_train_on_the_released_evaluation_patches_from_a_random_crop(splits):
    from pretextlab.tasks.patches import PatchOptions
    from pretextlab.tasks.relative_patch import RelativePatchTask

    task = RelativePatchTask(16, PatchOptions(image_size=28, patch_size=8))  # resize 28, crop 24, 8-px patches
    images = splits.train.take(np.arange(8))[0]
    central, views = task.eval_views(images)
    one, one_views = augmented_views(task, images, torch.Generator().manual_seed(0))
    two, _ = augmented_views(task, images, torch.Generator().manual_seed(1))
    # Released jigsaw/relative-patch evaluation (config/evaluation/jigsaw_or_relative_patch_location.sh:31-36):
    # resize, a crop of 3 patches (random in training), 3x3 adjacent patches, no jitter.
    assert one.shape == central.shape and one_views == views == 9
    assert task.eval_geometry.jitter == 0
    assert not torch.equal(one, two) and not torch.equal(one, central)


@pytest.mark.slow  # trains a small run, then two evaluate commands: ~6 s
def test_evaluate_command_runs_either_preset_and_says_which(tmp_path, capsys):
    # The command in process (main returns the exit code): the command in a process of its own, stdout
    # JSON only, is test_evaluation_suite's folder-dataset test; the `python -m pretextlab` entry,
    # test_run_dir_faults.py's.
    from pretextlab.cli import main
    from pretextlab.config import TrainConfig
    from pretextlab.training import Trainer

    run_dir = tmp_path / "rot"
    Trainer(TrainConfig(task="rotation", network="resnet50v1", width=1, image_size=32, limit=320, val_size=32,
                        test_limit=32, epochs=0.5, batch_size=32, device="cpu", val_batches=1, monitor_every=0),
            run_dir, progress=False).fit()
    common = ["evaluate", "--run", str(run_dir), "--probe", "sgd", "--sgd-epochs", "2", "--sgd-batch-size", "64",
              "--limit", "300", "--val-size", "100", "--test-limit", "200", "--device", "cpu", "--no-progress"]
    stored = {}
    for extra in (["--sgd-preset", "paper"], []):  # no flag: Fashion-MNIST's default, the fast recipe
        code = main([*common, *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        [result] = json.loads(out)["results"]
        stored[result["sgd_preset"]] = (result, json.loads(open(result["result_file"]).read()))
    paper, paper_file = stored["paper"]
    fast, fast_file = stored["precomputed"]
    assert (paper["train_images"], paper["val_split"], paper_file["probe_config"]["features"]) == (300, "test", "augmented")
    assert (fast["train_images"], fast["val_split"], fast_file["probe_config"]["features"]) == (200, "val", "precomputed")
    assert paper_file["recipe_hash"] != fast_file["recipe_hash"] and "-augmented-" in paper["result_file"]


def test_paper_preset_on_image_files_decodes_the_whole_training_split_in_worker_processes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 5)):
        for label, name in enumerate(("coats", "shirts")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.full((32, 40, 3), 60 + 120 * label, dtype=np.uint8)
                noise = rng.integers(0, 60, size=base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i}.jpg", quality=90)
    splits = load_dataset("folder", data_dir=str(tmp_path / "data"), image_size=28, val_size=4)
    whole = whole_training_split(splits.train, splits.val)
    assert len(whole) == 20 and sorted(whole.relative_paths.tolist()) == sorted(
        splits.train.relative_paths.tolist() + splits.val.relative_paths.tolist()
    )
    network, task = TinyNet(), _task()
    config = EvalConfig(outputs=("pre_logits",), probe="sgd", dataset="folder", sgd_epochs=2, sgd_batch_size=8,
                        device="cpu", workers=1)
    assert config.resolved_sgd_preset() == "paper"  # the folder default
    record = probe_representation(
        network, task.eval_views, splits, ("pre_logits",), tmp_path / "features", "key", config, progress=False,
        train_views=lambda x, g: augmented_views(task, x, g), log=lambda message: None,
    )["pre_logits"]
    assert (record["train_images"], record["val_split"], record["test_images"]) == (20, "test", 10)
    assert record["sgd_preset"] == "paper" and [e["epoch"] for e in record["curve"]] == [1, 2]
