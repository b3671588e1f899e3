"""ResNet50 v1 (post-activation) and v2 (pre-activation) at any widening factor k.

The study's definition (paper Sec. 3.1; the released code's models/resnet.py), laid out like torchvision's models/resnet.py:
stem 7x7 conv stride 2 to 16k channels (v1: BN-ReLU after it), 3x3 max-pool stride 2; four stages
of 3, 4, 6, 3 bottleneck units with output widths 64k, 128k, 256k, 512k, inner width a quarter of
that, the stride on the 3x3 conv; global average pooling to 512k pre-logits. At k=4 ResNet50 v1
has exactly torchvision ``resnet50``'s parameter shapes (see torchvision_convert.py).

Where the released TensorFlow code differs from torchvision, the released code is followed:
the stem max-pool pads with zeros (TF ``fixed_padding``), not -inf. After v1's BN-ReLU the two
are identical; for v2 the unnormalised stem output is pooled as the released code pools it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.models.registry import Network, NetworkShape, check_final_relu, register_network

STAGE_DEPTHS = (3, 4, 6, 3)
STAGE_WIDTH_MULTIPLIERS = (64, 128, 256, 512)  # stage output width = multiplier * k
STEM_WIDTH_MULTIPLIER = 16
STAGE_STRIDES = (1, 2, 2, 2)
PATCH_STAGE_STRIDES = (1, 2, 2, 1)  # Jigsaw / Relative Patch Location on 64x64 patches
OUTPUTS = tuple(f"block{i + 1}" for i in range(len(STAGE_DEPTHS))) + ("pre_logits",)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def stem_max_pool() -> nn.Sequential:
    """3x3 max-pool stride 2 over a zero-padded map, as the released code (TF fixed_padding)."""
    return nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(kernel_size=3, stride=2))


class Stem(nn.Module):
    """7x7 conv (stride 2, or 1 in patch mode) [+ BN-ReLU for v1], then the 3x3/2 max-pool."""

    def __init__(self, out_channels: int, stride: int, normalize: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, kernel_size=7, stride=stride, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels) if normalize else None
        self.relu = nn.ReLU(inplace=True)
        self.pool = stem_max_pool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.relu(self.bn(x))
        return self.pool(x)


class Projection(nn.Module):
    """v1's projection shortcut: 1x1 conv (with the unit's stride) + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = conv1x1(in_channels, out_channels, stride)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet v1 unit: 1x1 -> BN-ReLU -> 3x3 (stride) -> BN-ReLU -> 1x1 -> BN, + shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.conv1 = conv1x1(in_channels, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, inner, stride)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = Projection(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PreActBottleneck(nn.Module):
    """ResNet v2 unit: BN-ReLU -> 1x1 -> BN-ReLU -> 3x3 (stride) -> BN-ReLU -> 1x1, + shortcut.

    The projection shortcut (a 1x1 conv, no BN) reads the pre-activated input; the identity
    shortcut reads the raw input. Nothing follows the addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, inner)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, inner, stride)
        self.bn3 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, out_channels)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


class ResNet50(Network):
    """ResNet50 v1 or v2. Outputs block1..block4 (stage outputs) and pre_logits (flat, 512k).

    v2 ends with a BN (+ ReLU unless ``final_relu=False``, the "(-)" variant) before pooling;
    v1's last unit already ends with a ReLU, so it has no such switch.
    """

    def __init__(self, version: str, shape: NetworkShape) -> None:
        if version not in ("v1", "v2"):
            raise PretextlabError(f"ResNet50 version must be 'v1' or 'v2', got {version!r}")
        check_final_relu(f"resnet50{version}", shape.final_relu)
        super().__init__(f"resnet50{version}", shape)
        width, patch_mode = shape.width, shape.patch_mode
        self.version = version
        unit = Bottleneck if version == "v1" else PreActBottleneck
        self.stem = Stem(STEM_WIDTH_MULTIPLIER * width, stride=1 if patch_mode else 2, normalize=version == "v1")
        strides = PATCH_STAGE_STRIDES if patch_mode else STAGE_STRIDES
        stages = []
        in_channels = STEM_WIDTH_MULTIPLIER * width
        for depth, multiplier, stride in zip(STAGE_DEPTHS, STAGE_WIDTH_MULTIPLIERS, strides):
            out_channels = multiplier * width
            units = [unit(in_channels, out_channels, stride)]
            units += [unit(out_channels, out_channels, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(in_channels) if version == "v2" else None
        self.relu = nn.ReLU(inplace=True)
        self.output_names = OUTPUTS
        self._add_representation_layer(in_channels)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        outputs: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            outputs[f"block{index + 1}"] = x
        if self.final_bn is not None:
            x = self.final_bn(x)
            if self.final_relu:
                x = self.relu(x)
        outputs["pre_logits"] = self._pre_logits(x.mean(dim=(2, 3)))
        return outputs


@register_network(
    "resnet50v1",
    title="ResNet50 v1",
    outputs=OUTPUTS,
    default_width=4,
    no_final_relu_variant_because="ResNet v1 ends every unit with a ReLU after the addition, so its pre-logits are "
    "always rectified",
)
def resnet50v1(width: int = 4, **options: Any) -> ResNet50:
    """ResNet50 v1 at widening factor ``width``; ``options`` are ``NetworkShape``'s other fields."""
    return ResNet50("v1", NetworkShape(width, **options))


@register_network("resnet50v2", title="ResNet50 v2", outputs=OUTPUTS, default_width=4, has_final_relu_variant=True)
def resnet50v2(width: int = 4, **options: Any) -> ResNet50:
    """ResNet50 v2 at widening factor ``width``; ``options`` are ``NetworkShape``'s other fields."""
    return ResNet50("v2", NetworkShape(width, **options))
