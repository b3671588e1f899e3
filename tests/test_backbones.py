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
