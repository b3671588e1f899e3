"""Multi-process training with PyTorch's own engine: torchrun's environment, DDP, cross-rank BatchNorm.

`pretextlab train` runs unchanged under ``torchrun``: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK,
and ``distributed_context`` turns them into an initialised process group (NCCL on GPUs, gloo on
CPU). The study's default is per-device BatchNorm statistics; ``--sync-bn`` computes them over the
global batch instead. PyTorch's ``SyncBatchNorm`` only runs on accelerators, so on CPU (gloo) the
same computation is done by ``CrossRankBatchNorm`` with differentiable all-reduces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from pretextlab.errors import PretextlabError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context(device_kind: str) -> DistributedContext:
    """The process's place in a torchrun job (initialising the process group), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError as error:
        raise PretextlabError(
            f"WORLD_SIZE={world_size} is set but {error.args[0]} is not: launch multi-process runs with torchrun"
        ) from None
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(values: list[float], device: torch.device, context: DistributedContext) -> list[float]:
    """Sums of ``values`` over all ranks (the values themselves in a single process)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    Mean and variance are reduced over all ranks with differentiable all-reduces (two passes, so
    the variance does not suffer the cancellation of E[x^2] - E[x]^2); the gradient then flows
    through the statistics exactly as in single-process BatchNorm over the concatenated batch.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise PretextlabError(f"BatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = x.new_tensor([x.numel() / channels])
        totals = dist_fn.all_reduce(torch.cat([x.sum(dims), local_count]))
        count = totals[-1]
        mean = totals[:channels] / count
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device_kind: str) -> nn.Module:
    """Every BatchNorm of ``module`` computing global-batch statistics (torch's on GPU, ours on CPU)."""
    if device_kind == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device_kind))
    return converted
