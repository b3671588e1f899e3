"""The L-BFGS probe data-parallel over an initialised process group (torchrun, a study cell's DDP job).

Call these on every rank of the group, with the same arguments: each rank loads only its block of
the training rows (``Shard.rows``), so a rank holds 1/world of the features, and the L2 chosen and
the accuracies are those of one process (see ``lbfgs``'s module doc). Rank 0's result is the one to
store; every rank returns the same numbers.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pretextlab.devices import resolve_device
from pretextlab.evaluate.common import SINGLE, ProbeData, Shard
from pretextlab.evaluate.lbfgs import LbfgsConfig, LbfgsResult, fit_lbfgs_probe
from pretextlab.training.distributed import distributed_context

__all__ = ["process_shard", "sharded_lbfgs_fit", "sharded_lbfgs_probe"]


def sharded_lbfgs_probe(data: ProbeData, config: LbfgsConfig | None = None, progress: bool = True, label: str = "") -> LbfgsResult:
    """``lbfgs_probe`` sharded over the default process group (which must be initialised)."""
    return sharded_lbfgs_fit(data, config, progress, label)[0]


def sharded_lbfgs_fit(
    data: ProbeData, config: LbfgsConfig | None = None, progress: bool = True, label: str = "", dtype: torch.dtype = torch.float32,
) -> tuple[LbfgsResult, torch.Tensor, torch.Tensor]:
    """``fit_lbfgs_probe`` sharded over the default process group: the result and the chosen
    classifier (W, b), the same on every rank."""
    return fit_lbfgs_probe(data, config, progress=progress, label=label, shard=Shard.of_process_group(), dtype=dtype)


def process_shard(device: str = "auto") -> Shard:
    """This process's shard: the initialised process group's (a study cell's DDP job), torchrun's
    (WORLD_SIZE > 1: the group is initialised here, NCCL on CUDA, gloo on CPU), else one process."""
    if dist.is_available() and dist.is_initialized():
        return Shard.of_process_group() if dist.get_world_size() > 1 else SINGLE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    distributed_context(resolve_device(device).type)
    return Shard.of_process_group()
