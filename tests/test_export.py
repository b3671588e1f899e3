"""pretextlab export (issue 17 item 3): a run's network in torchvision's, timm's and its own safetensors
layout, loaded back there with the same pre_logits, the checkpoint it came from recorded; torch.hub.

Runs are made through the project's own writers (config.json, write_checkpoint) rather than
trained: export reads a run's checkpoint whatever produced it, and a training step would cost
more than every check here. BatchNorm statistics and affines are drawn at random so that a
misplaced running mean, variance or epsilon changes the features. Comparisons are in float64, so
the 1e-5 tolerance holds on any CPU (the two sides differ only in summation order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pretextlab import atomic
from pretextlab.cli import main
from pretextlab.config import TrainConfig, resolve
from pretextlab.errors import PretextlabError
from pretextlab.models import build_network, export_network, load_exported
from pretextlab.training import checkpoint_identity, load_trained
from pretextlab.training.checkpoint import write_checkpoint
from pretextlab.training.model import build_model
from pretextlab.training.run_dir import RunFiles, config_record

REPO = Path(__file__).resolve().parents[1]


def _randomize_batchnorm(network: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.05 + 0.01)  # small: eps matters
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def _make_run(root: Path, step: int = 3, **fields: object) -> Path:
    """A run directory holding ``fields``' config and a checkpoint at ``step`` of randomised weights."""
    config = resolve(TrainConfig(**fields))
    torch.manual_seed(0)
    network, task = build_model(config)
    _randomize_batchnorm(network, seed=1)
    files = RunFiles(root)
    root.mkdir(parents=True)
    atomic.write_json(files.config, config_record(config, world_size=1))
    write_checkpoint(files, {"network": network.state_dict(), "task": task.state_dict(), "step": step, "total_steps": 10})
    return root


def _images(side: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _close(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))


def _export(run: Path, fmt: str, out: Path, capsys: pytest.CaptureFixture) -> dict:
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)  # stdout is one JSON document and nothing else


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # --bn-init released: BatchNorm eps 1e-3, which torchvision's and timm's 1e-5 must not change.
    return _make_run(tmp_path_factory.mktemp("export") / "run", network="resnet50v1", width=4, image_size=32, bn_init="released")


@pytest.mark.slow  # ~5 s: ResNet50s at k=4 built, saved and run at 32 px in float64
def test_resnet50v1_exports_to_torchvision_and_timm_with_the_same_pre_logits(resnet_run, tmp_path, capsys):
    import timm
    import torchvision

    _, ours, _ = load_trained(resnet_run)
    images = _images(32)
    expected = ours.double()(images)["pre_logits"].detach()

    shown = _export(resnet_run, "torchvision", tmp_path / "tv" / "resnet50.pth", capsys)
    record = json.loads((tmp_path / "tv" / "resnet50.pth.json").read_text())
    assert shown["checkpoint"] == record["provenance"]["checkpoint"] and shown["record"] == str(tmp_path / "tv" / "resnet50.pth.json")
    assert (record["provenance"]["checkpoint"]["step"], record["provenance"]["checkpoint"]["sha256"]) == (
        3, checkpoint_identity(resnet_run).sha256)
    assert record["target"]["model"] == "resnet50" and record["network"]["bn_init"] == "released"
    with torch.device("meta"):  # loaded with assign=True below: no random init to pay for
        reference = torchvision.models.resnet50()
    state = torch.load(tmp_path / "tv" / "resnet50.pth", weights_only=True)
    loaded = reference.load_state_dict(state, strict=False, assign=True)
    assert (sorted(loaded.missing_keys), loaded.unexpected_keys) == (["fc.bias", "fc.weight"], [])
    reference.fc = nn.Identity()
    _close(reference.double().eval()(images), expected)

    # The timm layout through timm's own strict loader, from a safetensors container (the suffix picks it).
    export_network(ours.float(), "timm", tmp_path / "resnet50.safetensors", record["provenance"])
    model = timm.create_model("resnet50", pretrained=False, num_classes=0, checkpoint_path=str(tmp_path / "resnet50.safetensors"))
    _close(model.double().eval()(images), expected)
    # A library-layout export is not this package's: load_exported says how to load it instead.
    with pytest.raises(PretextlabError, match=r"timm's resnet50 layout.*timm\.create_model"):
        load_exported(tmp_path / "resnet50.safetensors")


def test_vgg19bn_exports_to_torchvision_and_timm_features(tmp_path):
    import timm
    import torchvision

    torch.manual_seed(0)
    ours = build_network("vgg19bn", 8, input_size=32)
    _randomize_batchnorm(ours, seed=3)
    images = _images(32, count=1)
    expected = nn.functional.max_pool2d(ours.double().eval()(images)["block5"], 2).detach()  # library features end with this pool
    ours.float()
    for fmt, build in (("torchvision", lambda: torchvision.models.vgg19_bn()), ("timm", lambda: timm.create_model("vgg19_bn", num_classes=0))):
        record = export_network(ours, fmt, tmp_path / f"{fmt}.pth", {"note": "built here"})
        assert record["provenance"] == {"note": "built here"} and "fc6/fc7" in record["target"]["left_out"]
        with torch.device("meta"):  # the libraries' 120M-parameter classifiers are never allocated
            reference = build()
        loaded = reference.load_state_dict(torch.load(tmp_path / f"{fmt}.pth", weights_only=True), strict=False, assign=True)
        assert loaded.unexpected_keys == [] and all(not k.startswith("features.") for k in loaded.missing_keys)
        _close(reference.features.double().eval()(images), expected)


def test_safetensors_round_trips_revnet50_and_torch_hub_loads_the_run(tmp_path, capsys):
    run = _make_run(tmp_path / "run", step=5, network="revnet50", width=1, final_relu=False, representation_size=48,
                    image_size=32, bn_init="released")
    _, ours, _ = load_trained(run)
    images = _images(32)
    expected = ours.double()(images)["pre_logits"].detach()

    out = tmp_path / "revnet50.safetensors"
    shown = _export(run, "safetensors", out, capsys)
    assert shown["checkpoint"]["step"] == 5 and shown["checkpoint"]["sha256"] == checkpoint_identity(run).sha256
    exported = load_exported(out)
    assert (exported.name, exported.width, exported.final_relu, exported.representation_size) == ("revnet50", 1, False, 48)
    assert not exported.training and {m.eps for m in exported.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    _close(exported.double()(images)["pre_logits"], expected)

    hub = torch.hub.load(str(REPO), "revnet50", run=str(run), source="local")
    _close(hub.double()(images)["pre_logits"], expected)
    from_file = torch.hub.load(str(REPO), "revnet50", weights=str(out), source="local")
    _close(from_file.double()(images)["pre_logits"], expected)
    fresh = torch.hub.load(str(REPO), "resnet50v2", width=1, final_relu=False, source="local")
    assert (fresh.name, fresh.width, fresh.final_relu) == ("resnet50v2", 1, False)
    with pytest.raises(PretextlabError, match="holds a revnet50, not a vgg19bn.*'revnet50'"):
        torch.hub.load(str(REPO), "vgg19bn", run=str(run), source="local")


def test_networks_without_a_library_form_fail_naming_those_that_have_one(tmp_path, capsys):
    run = _make_run(tmp_path / "run", network="resnet50v1", width=1, image_size=32)
    out = tmp_path / "out" / "resnet50.pth"
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.parent.exists()  # nothing half-written, no stray directory
    (line,) = captured.err.splitlines()
    assert line.startswith("pretextlab: error: resnet50v1 at width 1 has no timm counterpart")
    assert "resnet50v1 at width 4 (resnet50)" in line and "vgg19bn at width 8 (vgg19_bn)" in line and "--format safetensors" in line
    with torch.device("meta"):  # refused before any weight is read: the networks need no memory
        v2, patches, v1 = build_network("resnet50v2", 4), build_network("resnet50v1", 4, patch_mode=True), build_network("resnet50v1", 1)
    with pytest.raises(PretextlabError, match="resnet50v2 has no torchvision counterpart.*--format safetensors"):
        export_network(v2, "torchvision", tmp_path / "v2.pth")
    with pytest.raises(PretextlabError, match="built for patches"):
        export_network(patches, "torchvision", tmp_path / "patch.pth")
    with pytest.raises(PretextlabError, match="name --out with .safetensors"):
        export_network(v1, "safetensors", tmp_path / "model.pth")
    assert list(tmp_path.glob("*.pth*")) == []
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PretextlabError, match="junk.safetensors is not a safetensors file"):
        load_exported(tmp_path / "junk.safetensors")
