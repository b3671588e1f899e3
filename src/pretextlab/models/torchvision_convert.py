"""Weights between this package's networks and torchvision's (and timm's, which names them the same).

ResNet50 v1 at k=4 has exactly torchvision ``resnet50``'s layers (its fc aside), only named
differently; these functions rename the state-dict entries both ways:

    torchvision                      pretextlab resnet50v1
    conv1, bn1                       stem.conv, stem.bn
    layer{s}.{u}.conv{n}/bn{n}       stages.{s-1}.{u}.conv{n}/bn{n}
    layer{s}.{u}.downsample.0 / .1   stages.{s-1}.{u}.shortcut.conv / .bn
    fc                               (none: the task owns the head)

VGG19-BN at k=8 has torchvision ``vgg19_bn``'s convolutional part (``features``); only that part
converts. torchvision's convs there carry a bias that the study's bias-free convs lack: a bias b
before BatchNorm is removed by the batch mean in train mode and equals running_mean - b in eval
mode, so it is folded into the running mean, which keeps the function exact in both modes (and
is exported as a zero bias). torchvision's classifier is Linear layers with biases, dropout and
no BatchNorm, while the study's fc6/fc7 are bias-free convs followed by BN, so they have no
torchvision counterpart and keep their own weights (load the converted dict with ``strict=False``).

timm's ``resnet50`` has torchvision's entry names and shapes exactly (its fc aside), and timm's
``vgg19_bn`` the same ``features.*``, so these dicts load into timm as they are (models/export.py).

BatchNorm's epsilon is not in a state dict: torchvision and timm build every BN with eps 1e-5,
while ``--bn-init released`` networks use TF's 1e-3 (models/registry.py). ``bn_eps=1e-5`` in the
``*_to_torchvision`` functions re-expresses each running variance as running_var + eps - 1e-5, so
eval mode (what an exported backbone is loaded for) computes the same function; train mode
normalises with batch statistics and differs only by the epsilon itself.

Tensors are renamed, not copied (except the VGG running means that absorb a conv bias and
running variances re-expressed for another epsilon).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.models.resnet import ResNet50
from pretextlab.models.vgg import BLOCK_DEPTHS, VGG19BN

# The renaming table of the module docstring, read both ways: (torchvision name, our name). A
# {stage} is 1-based in torchvision's layerN and 0-based in our stages.N; the other fields match
# the same text on both sides.
_RESNET_NAMES = (
    ("conv1.weight", "stem.conv.weight"),
    ("bn1.{bn}", "stem.bn.{bn}"),
    ("layer{stage}.{unit}.{layer}", "stages.{stage}.{unit}.{layer}"),
    ("layer{stage}.{unit}.downsample.0.weight", "stages.{stage}.{unit}.shortcut.conv.weight"),
    ("layer{stage}.{unit}.downsample.1.{bn}", "stages.{stage}.{unit}.shortcut.bn.{bn}"),
)
_FIELDS = {
    "bn": r"weight|bias|running_mean|running_var|num_batches_tracked",
    "unit": r"\d+",
    "layer": r"(?:conv[123]|bn[123])\..+",
}
_STAGES = ("[1-4]", "[0-3]")  # torchvision's, ours


def _rename(key: str, side: int) -> str | None:
    """``key`` on ``side`` (0: torchvision, 1: ours) renamed for the other side; None if no rule fits."""
    fields = {**_FIELDS, "stage": _STAGES[side]}
    for names in _RESNET_NAMES:
        pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>{fields[m[1]]})", re.escape(names[side]))
        if match := re.fullmatch(pattern, key):
            values = match.groupdict()
            if "stage" in values:
                values["stage"] = str(int(values["stage"]) + (-1 if side == 0 else 1))
            return names[1 - side].format(**values)
    return None


def _resnet_key_from_torchvision(key: str) -> str | None:
    """Our name for a torchvision resnet50 entry; None for the fc entries; error otherwise."""
    if key.startswith("fc."):
        return None
    ours = _rename(key, 0)
    if ours is None:
        raise PretextlabError(
            f"{key!r} is not an entry of a torchvision resnet50 state dict: pass "
            "torchvision.models.resnet50(...).state_dict() (or a checkpoint of that model)"
        )
    return ours


def _resnet_key_to_torchvision(key: str) -> str:
    theirs = _rename(key, 1)
    if theirs is None:
        raise PretextlabError(f"{key!r} has no torchvision resnet50 counterpart")
    return theirs


def resnet50v1_from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision resnet50 state dict -> state dict for ``build_network('resnet50v1', 4)``.

    The fc entries are dropped (the pretext task owns the head).
    """
    converted = {}
    for key, tensor in state_dict.items():
        ours = _resnet_key_from_torchvision(key)
        if ours is not None:
            converted[ours] = tensor
    return converted


def _check_resnet50v1(network: object) -> ResNet50:
    if not isinstance(network, ResNet50) or network.version != "v1":
        raise PretextlabError(
            f"only resnet50v1 has torchvision resnet50's layout, got {getattr(network, 'name', type(network).__name__)}"
        )
    if network.width != 4:
        raise PretextlabError(
            f"torchvision resnet50 is resnet50v1 at width 4, this network has width {network.width}: "
            "only width 4 converts"
        )
    if network.representation is not None:
        raise PretextlabError(
            "this resnet50v1 has a representation layer (representation_size="
            f"{network.representation_size}) that torchvision resnet50 lacks: build it without one"
        )
    return network


def _state_for_eps(network: nn.Module, bn_eps: float | None) -> dict[str, torch.Tensor]:
    """``network``'s state dict, each BatchNorm's running variance re-expressed for epsilon
    ``bn_eps`` (None: as it is): var + eps - bn_eps keeps (x - mean) / sqrt(var + eps) in eval mode."""
    state = network.state_dict()
    if bn_eps is None:
        return state
    for name, module in network.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.eps != bn_eps and module.running_var is not None:
            key = f"{name}.running_var" if name else "running_var"
            state[key] = state[key] + (module.eps - bn_eps)
    return state


def resnet50v1_to_torchvision(network: ResNet50, bn_eps: float | None = None) -> dict[str, torch.Tensor]:
    """A width-4 resnet50v1's weights as a torchvision resnet50 state dict, fc excluded.

    Load it with ``torchvision_model.load_state_dict(d, strict=False)`` (only fc.* stays missing).
    ``bn_eps``: the epsilon of the BatchNorms the dict will be loaded into (torchvision's 1e-5), when
    it differs from the network's (module docstring); None leaves the running variances as they are.
    """
    network = _check_resnet50v1(network)
    return {_resnet_key_to_torchvision(key): tensor for key, tensor in _state_for_eps(network, bn_eps).items()}


def _vgg_feature_indices() -> list[tuple[int, int, int]]:
    """(block, layer, index of the conv in torchvision's ``features``): conv, BN, ReLU per layer
    and one max-pool after each block, so the BN of a layer sits at index + 1."""
    indices = []
    index = 0
    for block, depth in enumerate(BLOCK_DEPTHS):
        for layer in range(depth):
            indices.append((block, layer, index))
            index += 3
        index += 1
    return indices


def vgg19bn_from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg19_bn state dict -> the conv blocks of ``build_network('vgg19bn', 8)``.

    The classifier (fc6/fc7 in torchvision's Linear-with-bias form) is not converted; load the
    result with ``network.load_state_dict(d, strict=False)`` and fc6/fc7 keep their weights.
    """
    to_ours = {}
    for block, layer, index in _vgg_feature_indices():
        to_ours[f"features.{index}.weight"] = f"blocks.{block}.{layer}.conv.weight"
        for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            to_ours[f"features.{index + 1}.{entry}"] = f"blocks.{block}.{layer}.bn.{entry}"
    conv_biases = {f"features.{index}.bias": index for _, _, index in _vgg_feature_indices()}
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith("classifier.") or key in conv_biases:
            continue
        if key not in to_ours:
            raise PretextlabError(
                f"{key!r} is not an entry of a torchvision vgg19_bn state dict: pass "
                "torchvision.models.vgg19_bn(...).state_dict()"
            )
        converted[to_ours[key]] = tensor
    for bias_key, index in conv_biases.items():
        mean_key = f"features.{index + 1}.running_mean"
        if bias_key in state_dict and mean_key in state_dict:
            converted[to_ours[mean_key]] = state_dict[mean_key] - state_dict[bias_key]
    return converted


def vgg19bn_to_torchvision(network: VGG19BN, bn_eps: float | None = None) -> dict[str, torch.Tensor]:
    """A width-8 vgg19bn's conv blocks as torchvision vgg19_bn ``features.*`` entries.

    Load with ``strict=False``: the classifier stays missing (fc6/fc7 have no torchvision form).
    ``bn_eps`` as for ``resnet50v1_to_torchvision``.
    """
    if not isinstance(network, VGG19BN):
        raise PretextlabError(f"expected a vgg19bn network, got {getattr(network, 'name', type(network).__name__)}")
    if network.width != 8:
        raise PretextlabError(
            f"torchvision vgg19_bn is vgg19bn at width 8, this network has width {network.width}: only width 8 converts"
        )
    state = _state_for_eps(network, bn_eps)
    converted = {}
    for block, layer, index in _vgg_feature_indices():
        weight = state[f"blocks.{block}.{layer}.conv.weight"]
        converted[f"features.{index}.weight"] = weight
        converted[f"features.{index}.bias"] = weight.new_zeros(weight.shape[0])
        for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            converted[f"features.{index + 1}.{entry}"] = state[f"blocks.{block}.{layer}.bn.{entry}"]
    return converted
