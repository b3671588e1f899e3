"""RevNet50: the reversible counterpart of ResNet50 v2 at any widening factor k.

The study's definition (paper Sec. 3.1; RevNet of Gomez et al. 2017 as the released code's
models/revnet.py builds it): stem 7x7 conv stride 2 to 64k channels with no BN/ReLU, 3x3 max-pool stride 2 (over a
zero-padded map, as the released code); four stages of 3, 4, 6, 3 reversible units at widths
64k, 128k, 256k, 512k; between stages a 2x2 average pool stride 2 (TF 'SAME': a ragged edge
window averages only the pixels it covers) and zero channels padded on both sides to double the
width, no weights; a final BN (+ ReLU unless "(-)"), global average pooling, 512k pre-logits.

A reversible unit splits x into halves (x1, x2), computes y1 = x1 + F(x2) and outputs
concat(x2, y1), so the halves swap every unit. F is a pre-activation bottleneck
BN-ReLU-1x1(C/8)-BN-ReLU-3x3(C/8)-BN-ReLU-1x1(C/2); there is no G. The unit's input is recomputed
exactly from its output by ``ReversibleUnit.inverse``, the basis of the memory-saving backward.

BatchNorm and the inverse: in train mode F normalises with the batch statistics of x2, and
``inverse`` sees the very same x2, so recomputing F(x2) with batch statistics reproduces the
forward's F(x2) exactly. It does so inside ``batch_stats_without_update``, which makes the BN
layers normalise with the batch statistics without folding them into the running statistics a
second time (nor counting the batch in num_batches_tracked). In eval mode F uses the running
statistics both ways.

The memory-saving backward (``reversible_backward``, on by default) is in reversible.py: each
stage's chain of units keeps only its output and recomputes the rest in backward; with it the
stem switches to the lean backward of lean_stem.py.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as functional
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.models.registry import Network, NetworkShape, register_network
from pretextlab.models.lean_stem import lean_conv_max_pool
from pretextlab.models.reversible import ReconstructionCheck, batch_stats_without_update, reversible_sequence
from pretextlab.models.resnet import OUTPUTS, STAGE_DEPTHS, STAGE_WIDTH_MULTIPLIERS, conv1x1, conv3x3, stem_max_pool

STEM_WIDTH_MULTIPLIER = 64  # the stem projects straight to the first stage's width
TRANSITION_STRIDES = (2, 2, 2)  # before stages 2, 3, 4: overall stage strides (1, 2, 2, 2)
PATCH_TRANSITION_STRIDES = (2, 2, 1)  # stage strides (1, 2, 2, 1) for 64x64 patches


class ResidualFunction(nn.Module):
    """F of a reversible unit: BN-ReLU-1x1 -> BN-ReLU-3x3 -> BN-ReLU-1x1 on one half (C/2 channels),
    inner width C/8, output C/2 channels (a v2 bottleneck with no shortcut)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = channels // 4
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = conv1x1(channels, inner)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, inner)
        self.bn3 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))


class ReversibleUnit(nn.Module):
    """(x1, x2) -> (x2, x1 + F(x2)) on the channel halves; ``inverse`` undoes it exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise PretextlabError(f"a reversible unit splits its channels in halves: got an odd count {channels}")
        self.channels = channels
        self.F = ResidualFunction(channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.chunk(x, 2, dim=1)
        y1 = x1 + self.F(x2)
        return torch.cat([x2, y1], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The unit's input recomputed from its output ``y``.

        Runs F under the current grad mode (wrap in ``torch.no_grad()`` when recomputing for
        memory) and never updates BN running statistics (see ``batch_stats_without_update``).
        """
        x2, y1 = torch.chunk(y, 2, dim=1)
        with batch_stats_without_update(self.F):
            x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=1)


class PoolAndDoubleChannels(nn.Module):
    """Between stages: 2x2 average pool with the given stride (none for stride 1), then zero
    channels padded half before and half after to double the width. No weights."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # ceil_mode + no padding = TF 'SAME' pooling: a ragged edge window averages what it covers.
            x = functional.avg_pool2d(x, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        half = x.shape[1] // 2
        return functional.pad(x, (0, 0, 0, 0, half, half))

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class RevNetStem(nn.Module):
    """7x7 conv (stride 2, or 1 in patch mode) to 64k channels, no BN/ReLU, then the 3x3/2 max-pool.

    ``lean=True`` computes the same with a backward that stores only the images and the pool's
    argmax offsets (lean_stem.py), not the full-resolution convolution output and int64 indices.
    """

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, kernel_size=7, stride=stride, padding=3, bias=False)
        self.pool = stem_max_pool()

    def forward(self, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
        if lean:
            return lean_conv_max_pool(x, self.conv.weight, self.conv.stride[0], self.conv.padding[0])
        return self.pool(self.conv(x))


class RevNet50(Network):
    """RevNet50. Outputs block1..block4 (stage outputs) and pre_logits (flat, 512k).

    ``stages[i]`` is an ``nn.Sequential`` of the stage's ``ReversibleUnit``s (also given by
    ``reversible_units()``); ``transitions[i]`` is the weightless step before stage i + 2.

    ``reversible_backward`` (default on; an attribute, so it can be switched later) backpropagates
    through each stage by recomputing activations from the stage's output (reversible.py) instead
    of storing them: same gradients up to roundoff, activation memory of the stages independent of
    their depth, one extra evaluation of every F. A transition is recomputed (it is weightless)
    from the previous stage's output, which is kept anyway. The stem, then the largest store,
    switches to its lean backward (lean_stem.py: images and uint8 argmax offsets instead of its
    full-resolution map and int64 indices, same work, nothing recomputed); the head keeps ordinary
    autograd. ``reversible_check`` (a ``ReconstructionCheck``, or None) measures the recomputation's
    error in every backward and warns past its tolerance; it costs the memory the method saves,
    so it is for diagnosis.

    ``units_per_stage`` (default the study's 3, 4, 6, 3) builds deeper or shallower RevNets of the
    same shape, named ``revnet{3 * units + 2}`` unless they are the study's revnet50.

    The residual stream (the stages' inputs and outputs) is carried in at least float32: under
    bf16 autocast the convolutions of F run in bf16 but x1 + F(x2) is added in float32, because in
    bf16 the recomputation x1 = y1 - F(x2) would recover x1 only to bf16's 8 significant bits,
    an error that compounds unit by unit. Both backward modes compute the same function.
    """

    def __init__(
        self,
        shape: NetworkShape,
        reversible_backward: bool = True,
        reversible_check: bool | ReconstructionCheck = False,
        units_per_stage: Sequence[int] = STAGE_DEPTHS,
    ) -> None:
        units_per_stage = _checked_units_per_stage(units_per_stage)
        name = "revnet50" if units_per_stage == STAGE_DEPTHS else f"revnet{3 * sum(units_per_stage) + 2}"
        super().__init__(name, shape)
        width, patch_mode = shape.width, shape.patch_mode
        self.units_per_stage = units_per_stage
        self.reversible_backward = bool(reversible_backward)
        self.reversible_check = _as_check(reversible_check)
        self.stem = RevNetStem(STEM_WIDTH_MULTIPLIER * width, stride=1 if patch_mode else 2)
        self.stages = nn.ModuleList(
            nn.Sequential(*(ReversibleUnit(multiplier * width) for _ in range(depth)))
            for depth, multiplier in zip(units_per_stage, STAGE_WIDTH_MULTIPLIERS)
        )
        strides = PATCH_TRANSITION_STRIDES if patch_mode else TRANSITION_STRIDES
        self.transitions = nn.ModuleList(PoolAndDoubleChannels(stride) for stride in strides)
        channels = STAGE_WIDTH_MULTIPLIERS[-1] * width
        self.final_bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.output_names = OUTPUTS  # four stages whatever their depth
        self._add_representation_layer(channels)
        self._init_weights()

    def reversible_units(self) -> list[list[ReversibleUnit]]:
        """For each stage, its reversible units in order."""
        return [list(stage) for stage in self.stages]

    def _to_stream(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32))  # the residual stream; see the class doc

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        outputs: dict[str, torch.Tensor] = {}
        x = self._to_stream(self.stem(x, lean=self.reversible_backward))
        for index, stage in enumerate(self.stages):
            transition = self.transitions[index - 1] if index > 0 else None
            if self.reversible_backward:
                # A chain keeps its input and output only. From stage 2 on its input is the
                # previous stage's output, kept anyway, and the transition runs inside the chain as
                # its prelude: recomputed in backward, it gives the first unit its exact input (the
                # zero-padded channels exactly zero) at no memory cost.
                names = [f"block{index + 1}.unit{unit + 1}" for unit in range(len(stage))]
                x = reversible_sequence(list(stage), x, prelude=transition, names=names, check=self.reversible_check)
            else:
                x = stage(x if transition is None else transition(x))
            # The stage's output itself is the named output, so a loss on block1..block4 sends its
            # gradient into the reversible backward together with the downstream layers'.
            outputs[f"block{index + 1}"] = x
        x = self.final_bn(x)
        if self.final_relu:
            x = self.relu(x)
        outputs["pre_logits"] = self._pre_logits(x.mean(dim=(2, 3)))
        return outputs

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, units_per_stage={self.units_per_stage}, "
            f"reversible_backward={self.reversible_backward}, reversible_check={self.reversible_check is not None}"
        )


def _checked_units_per_stage(units_per_stage: Sequence[int]) -> tuple[int, ...]:
    try:
        units = tuple(units_per_stage)
    except TypeError:
        units = ()
    valid = len(units) == len(STAGE_DEPTHS) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in units
    )
    if not valid:
        raise PretextlabError(
            f"units_per_stage must be {len(STAGE_DEPTHS)} whole numbers >= 1 (reversible units in each stage), "
            f"got {units_per_stage!r}: the study's RevNet50 is {STAGE_DEPTHS}"
        )
    return units


def _as_check(reversible_check: bool | ReconstructionCheck) -> ReconstructionCheck | None:
    if isinstance(reversible_check, ReconstructionCheck):
        return reversible_check
    if isinstance(reversible_check, bool):
        return ReconstructionCheck() if reversible_check else None
    raise PretextlabError(
        f"reversible_check must be True, False or a ReconstructionCheck(tolerance=...), got {reversible_check!r}"
    )


@register_network(
    "revnet50", title="RevNet50", outputs=OUTPUTS, default_width=4, has_final_relu_variant=True,
    supports_reversible_backward=True,
)
def revnet50(
    width: int = 4,
    *,
    reversible_backward: bool = True,
    reversible_check: bool | ReconstructionCheck = False,
    units_per_stage: Sequence[int] = STAGE_DEPTHS,
    **options: Any,
) -> RevNet50:
    """RevNet50 at widening factor ``width``; ``options`` are ``NetworkShape``'s other fields."""
    return RevNet50(NetworkShape(width, **options), reversible_backward, reversible_check, units_per_stage)
