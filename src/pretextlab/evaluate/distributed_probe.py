"""The L-BFGS probe data-parallel over an initialised process group (torchrun, a study cell's DDP job).

Call these on every rank of the group, with the same arguments: each rank loads only its block of
the training rows (``Shard.rows``), so a rank holds 1/world of the features, and the L2 chosen and
the accuracies are those of one process (see ``lbfgs``'s module doc). Rank 0's result is the one to
store; every rank returns the same numbers.
"""

from __future__ import annotations

import torch

from pretextlab.evaluate.common import ProbeData, Shard
from pretextlab.evaluate.lbfgs import LbfgsConfig, LbfgsResult, fit_lbfgs_probe

__all__ = ["sharded_lbfgs_fit", "sharded_lbfgs_probe"]


def sharded_lbfgs_probe(data: ProbeData, config: LbfgsConfig | None = None, progress: bool = True, label: str = "") -> LbfgsResult:
    """``lbfgs_probe`` sharded over the default process group (which must be initialised)."""
    return sharded_lbfgs_fit(data, config, progress, label)[0]


def sharded_lbfgs_fit(
    data: ProbeData, config: LbfgsConfig | None = None, progress: bool = True, label: str = "", dtype: torch.dtype = torch.float32,
) -> tuple[LbfgsResult, torch.Tensor, torch.Tensor]:
    """``fit_lbfgs_probe`` sharded over the default process group: the result and the chosen
    classifier (W, b), the same on every rank."""
    return fit_lbfgs_probe(data, config, progress=progress, label=label, shard=Shard.of_process_group(), dtype=dtype)
