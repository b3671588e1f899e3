"""`evaluate --backbone`: torchvision and timm networks probed like a run (issue 17 item 4): a stored
result with the backbone's identity (weights file SHA-256, or random init and its seed) and its own
input normalisation, features that are the library's own pre_logits, clear errors for names and
weights that cannot be used, and `pretextlab report` tabulating them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretextlab.cli import main
from pretextlab.data import BatchLoader, load_dataset
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.backbones import BackboneSpec, build_backbone, evaluate_backbone
from pretextlab.evaluate.probe_run import EvalConfig
from pretextlab.report import build_report
from pretextlab.study.store import ResultsStore

# Tiny: 32-px inputs, 100 training images (50 held out to pick L2), 50 test images, one L2 value.
SPLITS = dict(limit=100, val_size=50, test_limit=50, seed=0)
SMALL = dict(**SPLITS, device="cpu", l2_grid=(1e-2,))
FLAGS = ["--image-size", "32", "--limit", "100", "--val-size", "50", "--test-limit", "50", "--l2-grid", "1e-2",
         "--device", "cpu", "--no-progress"]


def _cli(capsys, *args: str) -> tuple[int, str]:
    """The `pretextlab` command, run in this process (the import of torch is paid once): (exit status, stdout)."""
    capsys.readouterr()
    status = main(list(args))
    return status, capsys.readouterr().out


def _test_images() -> torch.Tensor:
    splits = load_dataset("fashion-mnist", image_size=32, **SPLITS)
    return next(iter(BatchLoader(splits.test, len(splits.test), shuffle=False))).images


@pytest.mark.slow  # resnet18, two L-BFGS probes and a report: 5-6 s measured on the shared 2 cores
def test_torchvision_backbone_from_the_command_line_is_stored_with_its_identity(tmp_path, capsys):
    out = tmp_path / "bb"
    status, stdout = _cli(capsys, "evaluate", "--backbone", "torchvision:resnet18", "--output", "layer4", "pre_logits",
                          "--out", str(out), *FLAGS)
    assert status == 0
    shown = json.loads(stdout)  # stdout is one JSON document
    assert shown["backbone"] == "torchvision:resnet18" and shown["run"] is None
    identity = shown["checkpoint"]
    assert identity["weights"] == "random-init" and identity["init_seed"] == 0 and identity["sha256"] is None
    # torchvision's own ImageNet normalisation, recorded with the result.
    assert identity["input"]["mean"] == [0.485, 0.456, 0.406] and identity["input"]["std"] == [0.229, 0.224, 0.225]
    by_output = {r["output"]: r for r in shown["results"]}
    assert by_output["pre_logits"]["feature_dim"] == 512  # resnet18's fc input
    assert by_output["layer4"]["feature_dim"] == 512 * 1 * 1  # a 32-px input leaves layer4 a 1x1 map
    for result in shown["results"]:
        stored = json.loads(Path(result["result_file"]).read_text())
        assert stored["checkpoint"] == identity and stored["backbone"] == "torchvision:resnet18"
        assert 10.0 < stored["test_top1_percent"] <= 100.0  # random-init features of 10 classes beat chance
    # The cached pre_logits are the network's own: the input of its fc layer on normalised grey images.
    [cached] = (out / "features").glob("*/test/pre_logits.npy")
    model = build_backbone(BackboneSpec(backbone="torchvision:resnet18", image_size=32)).model
    model.fc = torch.nn.Identity()
    x = _test_images().float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((x - mean) / std).numpy()
    # float32 through 18 layers, batched differently (another summation order): a few hundred ulps
    # of the largest feature, far below any real difference of network, node or input.
    np.testing.assert_allclose(np.load(cached), expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))

    status, stdout = _cli(capsys, "report", str(out), "--out", str(tmp_path / "report"))
    assert status == 0 and json.loads(stdout)["figures"] == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "torchvision:resnet18" in text and "random init (seed 0)" in text
    assert f"{by_output['pre_logits']['test_top1_percent']:.1f}" in text


@pytest.mark.slow  # three evaluations and a study report with its figures: ~7 s measured on the shared 2 cores
def test_timm_backbone_saved_weights_change_its_identity_and_a_study_report_lists_it(tmp_path):
    import timm

    spec = BackboneSpec(backbone="timm:test_resnet", image_size=32, out=str(tmp_path / "random"))
    config = EvalConfig(outputs=("layer2", "pre_logits"), **SMALL)
    random_init = {r["output"]: r for r in evaluate_backbone(spec, config, progress=False, log=lambda _: None)}
    assert set(random_init) == {"layer2", "pre_logits"}
    assert random_init["pre_logits"]["feature_dim"] == 96  # test_resnet's num_features
    assert random_init["pre_logits"]["checkpoint"]["input"]["mean"] == [0.5, 0.5, 0.5]  # timm's pretrained_cfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        weights = tmp_path / "test_resnet.pth"
        torch.save(timm.create_model("test_resnet").state_dict(), weights)
    loaded = dataclasses.replace(spec, weights=str(weights), out=str(tmp_path / "loaded"))
    with_weights = evaluate_backbone(loaded, config, progress=False, log=lambda _: None)[1]
    identity = with_weights["checkpoint"]
    assert identity["weights"] == "file" and identity["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert Path(with_weights["result_file"]).name != Path(random_init["pre_logits"]["result_file"]).name
    assert with_weights["weights_file"] == str(weights.resolve())
    # The same bytes under another name are the same weights: the same result file and features.
    copy = tmp_path / "copy.pth"
    shutil.copy(weights, copy)
    again = evaluate_backbone(dataclasses.replace(loaded, weights=str(copy)), config, progress=False, log=lambda _: None)[1]
    assert again["result_file"] == with_weights["result_file"]
    assert again["test_top1_percent"] == with_weights["test_top1_percent"]

    # A study's report tabulates them beside its runs (`pretextlab report STUDY --backbones DIR ...`).
    store_path = tmp_path / "study" / "results.sqlite"
    store_path.parent.mkdir()
    with ResultsStore(store_path) as store:
        store.register_run("0" * 12, task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={"task": "rotation"}, run_dir="/runs/0", plan=[("fashion-mnist", "pre_logits", "lbfgs", "all")])
    report = build_report(store_path, tmp_path / "report", backbones=[spec.out_dir(), loaded.out_dir()])
    text = report.markdown.read_text()
    table = text[text.index("## Backbones"):]
    # The weights by file name (the copy: the last evaluation of those bytes) and content hash.
    assert f"copy.pth (sha256 {identity['sha256'][:12]})" in table and "random init (seed 0)" in table
    assert table.count("| timm:test_resnet |") == 4  # layer2 and pre_logits of each weights
    assert "## Downstream dataset: fashion-mnist" in text  # the study's own sections are still there


@pytest.mark.parametrize(("backbone", "words"), [
    ("torchvision:resnet_18", ["no model 'resnet_18'", "resnet18", "torchvision.models.list_models()"]),
    ("timm:resnett18", ["no model 'resnett18'", "resnet18", "timm.list_models"]),
    ("keras:resnet50", ["LIB:NAME", "torchvision", "timm"]),
    ("resnet50", ["LIB:NAME"]),
])
def test_a_wrong_name_says_how_to_find_valid_ones(backbone, words):
    with pytest.raises(PretextlabError) as error:
        build_backbone(BackboneSpec(backbone=backbone))
    assert all(w in str(error.value) for w in words), str(error.value)


def test_weights_that_would_need_a_download_or_do_not_fit_are_clear_errors(tmp_path):
    with pytest.raises(PretextlabError, match=r"IMAGENET1K_V1: no such file.*never downloaded.*weights='DEFAULT'"):
        build_backbone(BackboneSpec(backbone="torchvision:resnet18", weights="IMAGENET1K_V1"))
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(PretextlabError, match=r"does not fit torchvision:resnet18: Missing key"):
        build_backbone(BackboneSpec(backbone="torchvision:resnet18", weights=str(other)))
    with pytest.raises(PretextlabError, match="has no output layer9: choose from layer1, layer2, layer3, layer4, pre_logits"):
        evaluate_backbone(BackboneSpec(backbone="torchvision:resnet18", out=str(tmp_path / "x")),
                          EvalConfig(outputs=("layer9",), **SMALL), progress=False)
    assert not (tmp_path / "x").exists()  # nothing written by a start that fails


def test_an_input_size_the_network_cannot_take_is_one_clear_error(tmp_path):
    # torchvision's ViT is built for 224-px inputs only.
    with pytest.raises(PretextlabError, match=r"torchvision:vit_b_16 does not run on 32x32 inputs.*--image-size"):
        evaluate_backbone(BackboneSpec(backbone="torchvision:vit_b_16", image_size=32, out=str(tmp_path / "vit")),
                          EvalConfig(**SMALL), progress=False)
    assert not (tmp_path / "vit").exists()


def test_every_probe_and_label_budget_reuses_one_feature_extraction(tmp_path, capsys):
    """The MLP (on cached features), the linear SGD probe (the released recipe: training features recomputed
    from the backbone's crops) and both forms of few labels on a backbone, as on a run: each stored under its
    own probe name and label budget, all from the features the first (L-BFGS) call extracted."""
    out = tmp_path / "bb"
    flags = ["--backbone", "timm:test_resnet", "--out", str(out), *FLAGS, "--sgd-epochs", "2", "--sgd-batch-size", "10"]

    def evaluate(*args: str) -> dict:
        status, stdout = _cli(capsys, "evaluate", *flags, *args)
        assert status == 0
        [result] = json.loads(stdout)["results"]
        stored = json.loads(Path(result["result_file"]).read_text())
        assert stored["backbone"] == "timm:test_resnet" and stored["checkpoint"]["weights"] == "random-init"
        return stored

    lbfgs = evaluate()
    cached = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*") if p.suffix in (".npy", ".json")}
    assert {p.parent.name for p in cached} == {"train", "val", "test"}
    mlp = evaluate("--probe", "mlp", "--labels-per-class", "2")
    paper = evaluate("--probe", "sgd", "--sgd-preset", "paper", "--label-fraction", "0.5")

    assert (lbfgs["probe"], mlp["probe"], paper["probe"]) == ("lbfgs", "mlp", "sgd")
    assert mlp["sgd_preset"] == "precomputed" and mlp["probe_config"]["kind"] == "mlp"
    # The released recipe recomputes training features from the backbone's own crops of train + held-out.
    assert paper["sgd_preset"] == "paper" and paper["probe_config"]["features"] == "augmented"
    assert paper["probe_config"]["kind"] == "linear" and paper["probe_config"]["standardize"] is False
    assert paper["train_split"] == "whole" and paper["val_split"] == "test"
    # Few labels say their budget: in the record, the recipe and the file name.
    assert (lbfgs["labels"], mlp["labels"], paper["labels"]) == ("all", "2pc", "0.5frac")
    assert mlp["train_images"] == 20 and mlp["eval_config"]["labels_per_class"] == 2
    assert paper["train_images"] == 50 and paper["eval_config"]["label_fraction"] == 0.5
    names = [Path(r["result_file"]).name for r in (lbfgs, mlp, paper)]
    assert len(set(names)) == 3 and "-lbfgs-all-" in names[0] and "-mlp-" in names[1] and "-2pc-" in names[1]
    assert "-sgd-augmented-" in names[2] and "-0.5frac-" in names[2]
    assert len({r["recipe_hash"] for r in (lbfgs, mlp, paper)}) == 3
    # One extraction served them all: the cached files are untouched; only the 2-per-class training
    # subset was extracted anew (the paper preset computes its training features on the fly).
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert {p.name for p in (out / "features").glob("*/*")} == {"train", "val", "test", "train-2pc-seed0"}


def test_an_image_folder_is_decoded_as_the_backbones_own_eval_transform(tmp_path, capsys):
    """`--dataset folder`: files resized to image size / crop fraction (timm's floor) and centre-cropped, then the
    backbone's normalisation: the cached features are the network's on timm's own eval transform."""
    import timm
    from PIL import Image

    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(("red", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (48, 48, 3), dtype=np.uint8)
                pixels[..., 0 if label == 0 else 2] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    out = tmp_path / "bb"
    flags = ["evaluate", "--backbone", "timm:test_resnet", "--dataset", "folder", "--data-dir", str(root), "--val-size",
             "4", "--image-size", "32", "--l2-grid", "1e-2", "--out", str(out), "--device", "cpu", "--no-progress"]
    status, stdout = _cli(capsys, *flags)
    assert status == 0
    [result] = json.loads(stdout)["results"]
    stored = json.loads(Path(result["result_file"]).read_text())
    assert Path(result["result_file"]).name.startswith("folder-tiny-pre_logits-lbfgs-all-")
    assert (stored["train_images"], stored["val_images"], stored["test_images"]) == (8, 4, 6)
    # test_resnet's pretrained_cfg: mean/std 0.5, crop_pct 0.95, so 32-px inputs from files resized to 33.
    assert stored["checkpoint"]["input"] == {
        "image_size": 32, "decode_size": 33, "crop": "centre", "mean": [0.5] * 3, "std": [0.5] * 3,
        "channels": "RGB, any file mode converted"}
    [features] = (out / "features").glob("*/test/pre_logits.npy")
    model = build_backbone(BackboneSpec(backbone="timm:test_resnet", image_size=32)).model
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**{**config, "input_size": (3, 32, 32)})
    files = sorted((root / "val").glob("*/*.jpg"))  # the test split: every val file, in scan order
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(torch.stack([transform(Image.open(f)) for f in files])),
                                      pre_logits=True).numpy()
    # float32 through a few layers, batched differently: far below what one pixel row of crop would change.
    np.testing.assert_allclose(np.load(features), expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))

    # --resize-size: the weights' own resize (torchvision's IMAGENET1K_V2 uses 232 for 224) replaces the
    # library's rule; recorded as the decode size, so its result is stored beside the rule's, not over it.
    status, stdout = _cli(capsys, *flags, "--resize-size", "40")
    assert status == 0
    [resized] = json.loads(stdout)["results"]
    assert json.loads(Path(resized["result_file"]).read_text())["checkpoint"]["input"]["decode_size"] == 40
    assert Path(resized["result_file"]).name != Path(result["result_file"]).name
    assert json.loads(Path(result["result_file"]).read_text()) == stored  # the rule's result is kept as it was
    # A resize smaller than the crop, or on Fashion-MNIST (its whole image is resized), is one clear line.
    for extra, words in ((["--resize-size", "31"], "--resize-size 31 is smaller than the 32-px input"),
                         (["--dataset", "fashion-mnist", "--resize-size", "40"], "drop --resize-size")):
        assert main([*flags, *extra]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("pretextlab: error: ") and words in line, line


def test_backbone_flags_with_a_run_are_one_clear_line(tmp_path, capsys):
    """--resize-size (and --weights, --image-size, --out) describe a backbone: with --run they are refused, naming each."""
    assert main(["evaluate", "--run", str(tmp_path), "--resize-size", "232"]) == 2
    err = capsys.readouterr().err
    assert "--resize-size goes with --backbone" in err and err.count("pretextlab: error:") == 1
    assert main(["evaluate", "--run", str(tmp_path), "--resize-size", "232", "--image-size", "224"]) == 2
    assert "--image-size, --resize-size go with --backbone" in capsys.readouterr().err
