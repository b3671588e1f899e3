"""The study's networks: shapes against torchvision, named outputs, RevNet inversion, bad input."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from forked_cli import ForkedProcess
from pretextlab.errors import PretextlabError
from pretextlab.models import (
    NETWORKS,
    ReversibleUnit,
    build_network,
    network_info,
    networks_table,
    parameter_count,
)
from pretextlab.models import registry as models_registry
from pretextlab.models.torchvision_convert import (
    resnet50v1_from_torchvision,
    resnet50v1_to_torchvision,
    vgg19bn_from_torchvision,
    vgg19bn_to_torchvision,
)

@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """On a small machine shared with other jobs, two intra-op threads spin against each other
    and a width-4 forward takes seconds instead of tens of milliseconds; one thread keeps this
    file fast. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# (name, final_relu): every network and the study's "(-)" variants.
VARIANTS = [
    ("resnet50v1", True),
    ("resnet50v2", True),
    ("resnet50v2", False),
    ("revnet50", True),
    ("revnet50", False),
    ("vgg19bn", True),
]


def _randomize(model: nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics, so BN is not the identity and a
    mis-mapped BN layer changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(torch.rand(channels, generator=generator) * 0.6 + 0.7)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


def _torchvision_features(model: torchvision.models.ResNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outputs = {}
    for index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        outputs[f"block{index + 1}"] = x
    outputs["pre_logits"] = torch.flatten(model.avgpool(x), 1)  # the input of torchvision's fc
    return outputs


# ---------------------------------------------------------------- torchvision correspondence


def test_resnet50v1_width4_has_torchvision_resnet50_parameter_shapes():
    with torch.device("meta"):
        ours = build_network("resnet50v1", width=4)
        reference = torchvision.models.resnet50()
    reference_shapes = [(k, tuple(v.shape)) for k, v in reference.state_dict().items() if not k.startswith("fc.")]
    ours_as_torchvision = [(k, tuple(v.shape)) for k, v in resnet50v1_to_torchvision(ours).items()]
    assert ours_as_torchvision == reference_shapes
    assert [tuple(p.shape) for p in ours.parameters()] == [
        tuple(p.shape) for name, p in reference.named_parameters() if not name.startswith("fc.")
    ]


def test_resnet50v1_loads_torchvision_weights_and_matches_its_features():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    _randomize(reference, seed=1)
    reference.eval()
    ours = build_network("resnet50v1", width=4).eval()
    ours.load_state_dict(resnet50v1_from_torchvision(reference.state_dict()), strict=True)

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = _torchvision_features(reference, x)
        got = ours(x)
    assert list(got) == ["block1", "block2", "block3", "block4", "pre_logits"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
    # The comparison means something: features vary across images and channels.
    assert expected["pre_logits"].std() > 1e-2
    assert not torch.allclose(expected["pre_logits"][0], expected["pre_logits"][1])


def test_resnet50v1_round_trip_to_torchvision():
    torch.manual_seed(2)
    ours = build_network("resnet50v1", width=4)
    _randomize(ours, seed=3)
    ours.eval()
    exported = resnet50v1_to_torchvision(ours)
    reference = torchvision.models.resnet50()
    result = reference.load_state_dict(exported, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    reference.eval()

    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(
            _torchvision_features(reference, x)["pre_logits"], ours(x)["pre_logits"], rtol=1e-5, atol=1e-5
        )
    back = resnet50v1_from_torchvision(reference.state_dict())
    original = ours.state_dict()
    assert list(back) == list(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_vgg19bn_width8_has_torchvision_vgg19_bn_conv_shapes_in_order():
    with torch.device("meta"):
        ours = build_network("vgg19bn")
        reference = torchvision.models.vgg19_bn()
    reference_convs = [tuple(m.weight.shape) for m in reference.features if isinstance(m, nn.Conv2d)]
    our_convs = [tuple(block_layer.conv.weight.shape) for block in ours.blocks for block_layer in block]
    assert len(our_convs) == 16
    assert our_convs == reference_convs
    # fc6 is torchvision's first Linear (25088 -> 4096) as a 7x7 conv; fc7 its second.
    assert ours.fc6.conv.weight.numel() == reference.classifier[0].weight.numel()
    assert tuple(ours.fc6.conv.weight.shape) == (4096, 512, 7, 7)
    assert ours.fc7.conv.weight.numel() == reference.classifier[3].weight.numel()


def _torchvision_vgg19_bn_features() -> nn.Sequential:
    """torchvision vgg19_bn's ``features`` alone, built by torchvision's own builder (its 120M
    parameter classifier, which does not convert, would only slow the test down)."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"], batch_norm=True)


def _as_vgg_state_dict(features: nn.Sequential) -> dict[str, torch.Tensor]:
    return {f"features.{key}": value for key, value in features.state_dict().items()}


def _torchvision_vgg_blocks(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output before its max-pool, read off torchvision's ``features``."""
    blocks = []
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(x)
        x = layer(x)
    return blocks


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vgg19bn_conv_blocks_convert_both_ways(mode):
    torch.manual_seed(4)
    reference = _torchvision_vgg19_bn_features()
    _randomize(reference, seed=5)
    with torch.no_grad():  # torchvision's convs have biases (zero at init): make them matter
        for layer in reference:
            if isinstance(layer, nn.Conv2d):
                layer.bias.normal_(0, 0.1)
    ours = build_network("vgg19bn", input_size=32)
    result = ours.load_state_dict(vgg19bn_from_torchvision(_as_vgg_state_dict(reference)), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(key.startswith(("fc6.", "fc7.")) for key in result.missing_keys)
    reference.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _torchvision_vgg_blocks(reference, x)
        got = ours(x)
    # In train mode the folded bias cancels against the batch mean only up to rounding, and 16
    # normalisations over a 2-image batch amplify it; a wrong fold would be off by ~0.1.
    atol = 1e-3 if mode == "train" else 1e-5
    assert len(expected) == 5
    for index, value in enumerate(expected):
        torch.testing.assert_close(got[f"block{index + 1}"], value, rtol=1e-4, atol=atol)

    # Export: conv weights and BN entries land on torchvision's names, conv biases are zero.
    exported = vgg19bn_to_torchvision(ours)
    assert set(exported) == set(_as_vgg_state_dict(reference))
    assert torch.equal(exported["features.0.weight"], ours.blocks[0][0].conv.weight)
    assert torch.equal(exported["features.49.bias"], torch.zeros(512))
    fresh = _torchvision_vgg19_bn_features()
    fresh.load_state_dict({key.removeprefix("features."): value for key, value in exported.items()})
    fresh.train(mode == "train")
    with torch.no_grad():
        for index, value in enumerate(_torchvision_vgg_blocks(fresh, x)):
            torch.testing.assert_close(got[f"block{index + 1}"], value, rtol=1e-4, atol=atol)


# ---------------------------------------------------------------- named outputs and shapes


def _expected_shapes(name: str, width: int, batch: int, patch_mode: bool) -> dict[str, tuple[int, ...]]:
    if name == "vgg19bn":
        sides = (64, 32, 16, 8, 4) if patch_mode else (224, 112, 56, 28, 14)
        shapes = {f"block{i + 1}": (batch, m * width, s, s) for i, (m, s) in enumerate(zip((8, 16, 32, 64, 64), sides))}
        shapes["fc6"] = (batch, 512 * width)
    else:
        sides = (32, 16, 8, 8) if patch_mode else (56, 28, 14, 7)
        shapes = {f"block{i + 1}": (batch, m * width, s, s) for i, (m, s) in enumerate(zip((64, 128, 256, 512), sides))}
    shapes["pre_logits"] = (batch, 512 * width)
    return shapes


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("patch_mode", [False, True], ids=["image224", "patch64"])
@pytest.mark.parametrize("name,final_relu", VARIANTS)
def test_named_output_shapes(name, final_relu, patch_mode, width):
    network = build_network(name, width=width, final_relu=final_relu, patch_mode=patch_mode).eval()
    side = 64 if patch_mode else 224
    with torch.no_grad():
        outputs = network(torch.randn(2, 3, side, side))
    expected = _expected_shapes(name, width, 2, patch_mode)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == expected
    assert list(outputs) == list(expected) == list(network.output_names)  # network order
    assert network.out_dim == 512 * width
    assert (network.name, network.width, network.patch_mode) == (name, width, patch_mode)
    assert all(torch.isfinite(v).all() for v in outputs.values())


@pytest.mark.parametrize("name", ["resnet50v2", "revnet50"])
def test_minus_variant_drops_the_final_relu(name):
    torch.manual_seed(6)
    with_relu = build_network(name, width=1)
    without = build_network(name, width=1, final_relu=False)
    without.load_state_dict(with_relu.state_dict())
    with_relu.train()
    without.train()  # batch statistics: the final BN output is centred, so about half is negative
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        rectified = with_relu(x)["pre_logits"]
        plain = without(x)["pre_logits"]
    # Global pooling of centred, unrectified features is near zero on average, and can be negative.
    assert (rectified >= 0).all()
    assert (plain < 0).any()
    assert not torch.allclose(rectified, plain)


def test_default_widths_and_patch_mode_defaults():
    with torch.device("meta"):
        assert build_network("resnet50v1").width == 4
        assert build_network("revnet50").width == 4
        vgg = build_network("vgg19bn")
        patch_vgg = build_network("vgg19bn", patch_mode=True)
    assert (vgg.width, vgg.out_dim, vgg.input_size, vgg.fc6_kernel_size) == (8, 4096, 224, 7)
    assert (patch_vgg.input_size, patch_vgg.fc6_kernel_size) == (64, 2)


def test_patch_mode_uses_stride_one_stem():
    network = build_network("resnet50v1", width=1, patch_mode=True)
    assert network.stem.conv.stride == (1, 1)
    assert build_network("revnet50", width=1, patch_mode=True).stem.conv.stride == (1, 1)
    assert build_network("resnet50v1", width=1).stem.conv.stride == (2, 2)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("size", [256, 1024])
def test_representation_size_sets_pre_logits(name, size):
    network = build_network(name, width=1, representation_size=size, patch_mode=True).eval()
    with torch.no_grad():
        outputs = network(torch.randn(2, 3, 64, 64))
    assert outputs["pre_logits"].shape == (2, size)
    assert network.out_dim == size
    assert network.representation.weight.shape == (size, 512)  # from the natural 512k pre-logits
    assert network.representation.bias is None


def test_residual_networks_accept_small_inputs():
    for name in ("resnet50v1", "resnet50v2", "revnet50"):
        network = build_network(name, width=1).eval()
        with torch.no_grad():
            for side in (16, 32, 57):
                assert network(torch.randn(2, 3, side, side))["pre_logits"].shape == (2, 512)


def test_vgg_built_for_other_input_size():
    network = build_network("vgg19bn", width=1, input_size=96).eval()
    assert network.fc6_kernel_size == 3
    with torch.no_grad():
        assert network(torch.randn(2, 3, 96, 96))["fc6"].shape == (2, 512)


def test_conv_biases_absent_and_init_like_torchvision():
    torch.manual_seed(7)
    for name in NETWORKS:
        network = build_network(name, width=1)
        convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
        assert convs and all(m.bias is None for m in convs)
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)); checked on a big conv.
    conv = build_network("resnet50v1", width=2).stages[3][0].conv2
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)


# ---------------------------------------------------------------- RevNet


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _trained_bn_unit(channels: int, seed: int) -> ReversibleUnit:
    torch.manual_seed(seed)
    unit = ReversibleUnit(channels)
    _randomize(unit, seed)
    return unit


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reversible_unit_inverse_recovers_input_and_keeps_running_stats(mode):
    unit = _trained_bn_unit(32, seed=8)
    unit.train(mode == "train")
    x = torch.randn(4, 32, 12, 12)
    with torch.no_grad():
        y = unit(x)
        buffers_after_forward = {k: v.clone() for k, v in unit.state_dict().items() if k.endswith(BN_BUFFERS)}
        recovered = unit.inverse(y)
    torch.testing.assert_close(recovered, x, rtol=0, atol=1e-5)
    assert not torch.allclose(y, torch.cat(torch.chunk(x, 2, dim=1)[::-1], dim=1))  # F did something
    for key, value in buffers_after_forward.items():
        assert torch.equal(unit.state_dict()[key], value), key
    if mode == "train":
        assert unit.F.bn1.num_batches_tracked.item() == 1  # the forward counted, the inverse did not
    # Layers are back to tracking running statistics afterwards.
    assert all(m.track_running_stats for m in unit.modules() if isinstance(m, nn.BatchNorm2d))


def test_revnet_stage_units_invert_a_whole_stage():
    torch.manual_seed(9)
    network = build_network("revnet50", width=1)
    units = network.reversible_units()
    assert [len(stage) for stage in units] == [3, 4, 6, 3]
    assert all(isinstance(unit, ReversibleUnit) for stage in units for unit in stage)
    assert [stage[0].channels for stage in units] == [64, 128, 256, 512]
    network.train()
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        y = network.stages[1](x)
        recovered = y
        for unit in reversed(units[1]):
            recovered = unit.inverse(recovered)
    torch.testing.assert_close(recovered, x, rtol=0, atol=1e-5)


def test_revnet_transition_pools_and_pads_channels_with_zeros():
    network = build_network("revnet50", width=1)
    x = torch.randn(1, 64, 7, 7)
    out = network.transitions[0](x)
    assert out.shape == (1, 128, 4, 4)
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))
    assert torch.equal(out[:, 96:], torch.zeros_like(out[:, 96:]))
    torch.testing.assert_close(out[:, 32:96, 0, 0], x[:, :, :2, :2].mean(dim=(2, 3)))
    # TF 'SAME' pooling: the ragged last window averages only the pixels it covers.
    torch.testing.assert_close(out[:, 32:96, 3, 3], x[:, :, 6, 6])


# ---------------------------------------------------------------- the table


@pytest.mark.slow
def test_networks_table_lists_every_network_with_computed_parameter_counts():
    table = networks_table()
    for name in NETWORKS:
        assert f"| {name} |" in table
    assert "| resnet50v2 (-) |" in table and "| revnet50 (-) |" in table
    # torchvision resnet50 has 25,557,032 parameters; its fc is 2048 * 1000 + 1000 of them.
    with torch.device("meta"):
        torchvision_without_fc = sum(
            p.numel() for n, p in torchvision.models.resnet50().named_parameters() if not n.startswith("fc.")
        )
    assert torchvision_without_fc == 25_557_032 - 2_049_000 == 23_508_032
    assert "| resnet50v1 | 4 | 23,508,032 | 2,048 |" in table
    assert parameter_count("resnet50v1", 4) == 23_508_032
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 * 4
    assert "| vgg19bn | 8 | 139,583,936 | 4,096 |" in table
    narrow = networks_table(widths=(1,))
    assert "| revnet50 | 1 |" in narrow and "| revnet50 | 4 |" not in narrow


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "resnet18"}, r"unknown network 'resnet18': choose one of resnet50v1, resnet50v2, revnet50, vgg19bn"),
        ({"name": "resnet50v1", "width": 0}, r"width must be an integer >= 1, got 0"),
        ({"name": "revnet50", "width": -2}, r"width must be an integer >= 1, got -2"),
        ({"name": "resnet50v2", "width": 2.5}, r"width must be an integer >= 1, got 2.5"),
        ({"name": "vgg19bn", "width": True}, r"width must be an integer >= 1, got True"),
        ({"name": "resnet50v1", "final_relu": False}, r"'\(-\)' variant\) does not exist for resnet50v1: ResNet v1"),
        ({"name": "vgg19bn", "final_relu": False}, r"does not exist for vgg19bn: VGG's pre-logits are fc7"),
        ({"name": "revnet50", "representation_size": 0}, r"representation_size must be an integer >= 1, got 0"),
        ({"name": "vgg19bn", "input_size": 16}, r"vgg19bn needs inputs of at least 32x32.*got input_size=16"),
        ({"name": "resnet50v1", "input_size": 0}, r"input_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_build_arguments(kwargs, message):
    with pytest.raises(PretextlabError, match=message):
        build_network(**kwargs)


@pytest.mark.parametrize("name", NETWORKS)
def test_bad_input_tensors(name):
    network = build_network(name, width=1, patch_mode=True).eval()
    with torch.no_grad():
        rank_message = r"takes a 4-d float tensor \(batch, 3, height, width\), got \(3, 64, 64\): add the batch"
        with pytest.raises(PretextlabError, match=rank_message):
            network(torch.randn(3, 64, 64))
        with pytest.raises(PretextlabError, match=r"takes 3-channel \(RGB\) images, got 1 channels"):
            network(torch.randn(2, 1, 64, 64))


def test_vgg_rejects_a_size_it_was_not_built_for():
    network = build_network("vgg19bn", width=1).eval()
    with torch.no_grad():
        size_message = r"built for 224x224 inputs .*7x7 conv.*got 64x64: build it with build_network\('vgg19bn', input_size=64\)"
        with pytest.raises(PretextlabError, match=size_message):
            network(torch.randn(2, 3, 64, 64))
        with pytest.raises(PretextlabError, match=r"got 224x200: VGG takes square inputs"):
            network(torch.randn(2, 3, 224, 200))


def test_converters_reject_networks_without_a_torchvision_form():
    with torch.device("meta"):
        with pytest.raises(PretextlabError, match=r"only resnet50v1 has torchvision resnet50's layout, got resnet50v2"):
            resnet50v1_to_torchvision(build_network("resnet50v2"))
        with pytest.raises(PretextlabError, match=r"has width 8: only width 4 converts"):
            resnet50v1_to_torchvision(build_network("resnet50v1", width=8))
        with pytest.raises(PretextlabError, match=r"representation layer \(representation_size=512\)"):
            resnet50v1_to_torchvision(build_network("resnet50v1", representation_size=512))
        with pytest.raises(PretextlabError, match=r"has width 4: only width 8 converts"):
            vgg19bn_to_torchvision(build_network("vgg19bn", width=4))
    with pytest.raises(PretextlabError, match=r"'head\.weight' is not an entry of a torchvision resnet50 state dict"):
        resnet50v1_from_torchvision({"head.weight": torch.zeros(1)})
    with pytest.raises(PretextlabError, match=r"'features\.99\.weight' is not an entry of a torchvision vgg19_bn"):
        vgg19bn_from_torchvision({"features.99.weight": torch.zeros(1)})


# ---------------------------------------------------------------- the registry and its metadata


def test_every_network_declares_the_outputs_its_forward_returns():
    for name in NETWORKS:
        info = network_info(name)
        assert info.name == name and info.title
        network = build_network(name, width=1, patch_mode=True).eval()
        with torch.no_grad():
            outputs = network(torch.randn(2, 3, 64, 64))
        assert tuple(outputs) == info.outputs == network.output_names, name
    with torch.device("meta"):
        assert [build_network(n).width for n in NETWORKS] == [network_info(n).default_width for n in NETWORKS] == [4, 4, 4, 8]
    assert [n for n in NETWORKS if network_info(n).has_final_relu_variant] == ["resnet50v2", "revnet50"]
    assert [n for n in NETWORKS if network_info(n).supports_reversible_backward] == ["revnet50"]


def test_the_network_registry_imports_no_network_family():
    # No cycle registry <-> resnet/revnet/vgg: the families import the registry, never the reverse.
    source = Path(models_registry.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    families = {f"pretextlab.models.{family}" for family in ("resnet", "revnet", "vgg")}
    assert not imported & families, sorted(imported & families)


def _register_and_build_a_toy_network() -> None:
    """Run in a forked child (its registry is a copy): registers "toy" from outside the package."""
    from pretextlab.models import Network, NetworkShape, register_network

    class Toy(Network):
        def __init__(self, shape):
            super().__init__("toy", shape)
            self.conv = torch.nn.Conv2d(3, shape.width, 3)
            self.output_names = ("block1", "pre_logits")
            self._add_representation_layer(shape.width)

        def forward(self, x):
            x = self.conv(x)
            return {"block1": x, "pre_logits": self._pre_logits(x.mean(dim=(2, 3)))}

    @register_network("toy", title="Toy", outputs=("block1", "pre_logits"), default_width=3,
                      no_final_relu_variant_because="toy has no ReLU at all")
    def toy(width=3, **options):
        return Toy(NetworkShape(width, **options))

    network = build_network("toy")
    assert network.width == 3 and network.out_dim == 3
    try:
        build_network("toy", final_relu=False)
    except PretextlabError as error:
        print(error)


def test_a_network_registered_from_outside_builds_and_follows_the_declared_rules():
    # In a child process, so the toy network does not join this process's registry: forked from
    # this one (forked_cli.py), which has the package imported already (a fresh `python -c` paid
    # ~1.5 CPU-s of imports for this).
    child = ForkedProcess(_register_and_build_a_toy_network)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert "does not exist for toy: toy has no ReLU at all; it exists for resnet50v2, revnet50" in out
    with pytest.raises(PretextlabError, match="unknown network 'toy'"):  # this process never saw it
        build_network("toy")


def test_the_options_every_network_takes_have_one_definition():
    # Issue 15: width, final_relu, patch_mode, representation_size and input_size are NetworkShape's
    # fields, taken whole by Network and each family instead of each listing them again.
    import dataclasses
    import inspect

    from pretextlab.models import NETWORKS, Network, NetworkShape, ResNet50, RevNet50, VGG19BN

    common = {field.name for field in dataclasses.fields(NetworkShape)}
    assert common == {"width", "final_relu", "patch_mode", "representation_size", "input_size"}
    for cls in (Network, ResNet50, RevNet50, VGG19BN):
        assert "shape" in inspect.signature(cls.__init__).parameters
        assert not common & set(inspect.signature(cls.__init__).parameters), cls
    for name in NETWORKS:
        with torch.device("meta"):
            network = build_network(name, 2, patch_mode=True, representation_size=7, input_size=64)
        assert (network.width, network.patch_mode, network.representation_size, network.input_size, network.out_dim) == (
            2, True, 7, 64, 7)
