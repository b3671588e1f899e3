"""The study's pooling rule: any named output brought within a budget of values per image.

The study's pooling rule (the paper's linear evaluation protocol): an output with
more than 9000 values per image is max-pooled with kernel = stride = ceil(sqrt(h*w*c / 9000)),
then flattened. This follows the released code's ``mode="max"`` branch of ``utils.adaptive_pool``,
which uses ``tf.contrib.layers.max_pool2d`` with its default 'VALID' padding: windows that do not
fit are dropped, i.e. ``ceil_mode=False`` here, so the result never exceeds the budget. The kernel
is clamped to the smaller spatial side, as the released code clamps it to the map size, so a
very wide 1x1-ish map still keeps one value per channel. (The released linear evaluation's
*default* was ``adaptive_max``, TF's fractional max pooling, whose windows are pseudo-random;
the deterministic rule above is the one the paper describes.)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretextlab.errors import PretextlabError

POOL_BUDGET = 9000  # the study's cap on the number of values per image fed to a probe


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise PretextlabError(f"the pooling budget must be a whole number of values >= 1 (the study uses 9000), got {budget!r}")
    return int(budget)


def pool_size(channels: int, height: int, width: int, budget: int = POOL_BUDGET) -> int:
    """Kernel = stride of the max-pooling that brings a (C, H, W) map within ``budget``; 1 = no pooling.

    ceil(sqrt(C*H*W / budget)) computed in integers (no float rounding at exact squares), then
    clamped to the smaller spatial side so that the pooled map keeps at least one position.
    """
    budget = _check_budget(budget)
    total = channels * height * width
    if total <= budget:
        return 1
    # Smallest s with s*s >= ceil(total / budget), which is the smallest s with s*s*budget >= total.
    needed = -(-total // budget)
    size = math.isqrt(needed - 1) + 1
    return max(1, min(size, height, width))


def pooled_dim(shape: Sequence[int], budget: int = POOL_BUDGET) -> int:
    """Flattened size of one example's output after ``pool_to_budget``, without running anything.

    ``shape`` is the shape of ONE example, without the batch dimension: (C, H, W) or (D,).
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 1 for d in dims):
        raise PretextlabError(f"every dimension of shape must be >= 1, got {dims}")
    if len(dims) == 1:
        return dims[0]
    if len(dims) == 3:
        channels, height, width = dims
        size = pool_size(channels, height, width, budget)
        return channels * (height // size) * (width // size)
    raise PretextlabError(
        f"pooled_dim takes the shape of one example: (C, H, W) for a feature map or (D,) for a vector, "
        f"got {dims} (drop the batch dimension)"
    )


def pool_to_budget(x: torch.Tensor, budget: int = POOL_BUDGET) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) max-pooled to at most ``budget`` values per example (see module doc);
    (B, D) passes through unchanged."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise PretextlabError(
            f"a named output must be a (B, D) vector or a (B, C, H, W) feature map to pool, got shape {tuple(x.shape)}"
        )
    size = pool_size(x.shape[1], x.shape[2], x.shape[3], budget)
    if size > 1:
        x = F.max_pool2d(x, kernel_size=size, stride=size, ceil_mode=False)
    return x.flatten(1)
