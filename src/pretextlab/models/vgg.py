"""VGG19-BN at any widening factor k (default 8, the standard VGG19 widths).

The study's definition (paper Sec. 3.1; the released code's models/vggnet.py): five blocks of 2, 2, 4, 4, 4
3x3 conv-BN-ReLU layers of widths 8k, 16k, 32k, 64k, 64k (64..512 at k=8), a 2x2 max-pool after
each block; fc6 is a conv whose kernel is the whole remaining map (7x7 at 224 input) to 512k
channels + BN-ReLU; fc7 a 1x1 conv to 512k + BN-ReLU, whose output is the pre-logits (4096 at k=8).
No dropout (BN instead), all convs bias-free.

fc6's kernel size depends on the input size, so a VGG is built for one input side
(``input_size``, default 224) and rejects other sizes with a clear error.

Patch mode: the released code applies the stem-stride/stage-stride change only to the residual
networks; VGG has no strided stem, all its downsampling is the five max-pools, and it is used
unchanged on the 64x64 patches. Here too: ``patch_mode`` only makes 64 the default input size,
so fc6 is a 2x2 conv over the 2x2 map left after five pools.

Named outputs: block1..block5 (each block's last ReLU, before its max-pool; the paper calls
block2..block5 "block1..block4"), fc6 and pre_logits, the last two flat (batch, 512k).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.models.registry import Network, NetworkShape, check_final_relu, register_network

BLOCK_DEPTHS = (2, 2, 4, 4, 4)
BLOCK_WIDTH_MULTIPLIERS = (8, 16, 32, 64, 64)  # block width = multiplier * k
FC_WIDTH_MULTIPLIER = 512  # fc6 and fc7 width = 512 * k
DEFAULT_INPUT_SIZE = 224
DEFAULT_PATCH_INPUT_SIZE = 64
DOWNSAMPLING = 2 ** len(BLOCK_DEPTHS)  # five 2x2/2 max-pools
OUTPUTS = tuple(f"block{i + 1}" for i in range(len(BLOCK_DEPTHS))) + ("fc6", "pre_logits")


class ConvBNReLU(nn.Module):
    """Bias-free conv -> BN -> ReLU ('same' padding for 3x3, none for the fc layers)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def remaining_size(input_size: int) -> int:
    """Side of the map fc6 sees: five floor-halvings (2x2 max-pools without padding)."""
    size = input_size
    for _ in BLOCK_DEPTHS:
        size //= 2
    return size


class VGG19BN(Network):
    """VGG19-BN. Outputs block1..block5 (4-d), fc6 and pre_logits (flat, 512k)."""

    def __init__(self, shape: NetworkShape) -> None:
        check_final_relu("vgg19bn", shape.final_relu)
        if shape.input_size is None:
            shape = dataclasses.replace(shape, input_size=DEFAULT_PATCH_INPUT_SIZE if shape.patch_mode else DEFAULT_INPUT_SIZE)
        input_size, width = shape.input_size, shape.width
        assert input_size is not None
        if input_size < DOWNSAMPLING:
            raise PretextlabError(
                f"vgg19bn needs inputs of at least {DOWNSAMPLING}x{DOWNSAMPLING} (five 2x2 max-pools), "
                f"got input_size={input_size}: use larger images or patches, or a residual network"
            )
        super().__init__("vgg19bn", shape)
        blocks = []
        in_channels = 3
        for depth, multiplier in zip(BLOCK_DEPTHS, BLOCK_WIDTH_MULTIPLIERS):
            out_channels = multiplier * width
            layers = [ConvBNReLU(in_channels, out_channels, kernel_size=3, padding=1)]
            layers += [ConvBNReLU(out_channels, out_channels, kernel_size=3, padding=1) for _ in range(depth - 1)]
            blocks.append(nn.Sequential(*layers))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc6_kernel_size = remaining_size(input_size)
        fc_width = FC_WIDTH_MULTIPLIER * width
        self.fc6 = ConvBNReLU(in_channels, fc_width, kernel_size=self.fc6_kernel_size, padding=0)
        self.fc7 = ConvBNReLU(fc_width, fc_width, kernel_size=1, padding=0)
        self.output_names = OUTPUTS
        self._add_representation_layer(fc_width)
        self._init_weights()

    def _check_size(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        if height == self.input_size and width == self.input_size:
            return
        fix = (
            f"build it with build_network('vgg19bn', input_size={height}) for {height}x{height} inputs"
            if height == width
            else "VGG takes square inputs: resize or crop them to a square"
        )
        raise PretextlabError(
            f"this vgg19bn was built for {self.input_size}x{self.input_size} inputs (fc6 is a "
            f"{self.fc6_kernel_size}x{self.fc6_kernel_size} conv over the map left after five max-pools) "
            f"but got {height}x{width}: {fix}"
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        self._check_size(x)
        outputs: dict[str, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            outputs[f"block{index + 1}"] = x
            x = self.pool(x)
        x = self.fc6(x)
        outputs["fc6"] = torch.flatten(x, 1)
        x = torch.flatten(self.fc7(x), 1)
        outputs["pre_logits"] = self._pre_logits(x)
        return outputs


@register_network(
    "vgg19bn",
    title="VGG19-BN",
    outputs=OUTPUTS,
    default_width=8,
    no_final_relu_variant_because="VGG's pre-logits are fc7's output, whose BN-ReLU is part of the layer",
)
def vgg19bn(width: int = 8, **options: Any) -> VGG19BN:
    """VGG19-BN at widening factor ``width``; ``options`` are ``NetworkShape``'s other fields."""
    return VGG19BN(NetworkShape(width, **options))
