"""The network and task head a config describes, their optimizer, and a trained run's weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretextlab.config import TrainConfig, task_options
from pretextlab.devices import resolve_device  # shared with evaluation; re-exported by training
from pretextlab.models import build_network, network_info
from pretextlab.tasks import PretextTask, build_task, task_class
from pretextlab.training.distributed import DistributedContext, convert_sync_batchnorm
from pretextlab.training.run_dir import CheckpointIdentity, load_checkpoint, load_config


def build_model(config: TrainConfig) -> tuple[nn.Module, PretextTask]:
    """The network and the task's head that a (resolved) config describes."""
    task_cls = task_class(config.task)
    extra = {}
    if network_info(config.network).supports_reversible_backward and config.reversible_backward is not None:
        extra["reversible_backward"] = config.reversible_backward
    network = build_network(
        config.network,
        width=config.width,
        final_relu=config.final_relu,
        patch_mode=task_cls.patch_mode,
        representation_size=config.representation_size,
        input_size=config.patch_size if task_cls.patch_mode else config.image_size,
        bn_init=config.bn_init,  # issue 16 item 4 (models/registry.py use_bn_init); None: a run recorded before it
        **extra,
    )
    task = build_task(config.task, network.out_dim, task_options(config))
    return network, task


def optimizer_for(network: nn.Module, task: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Momentum SGD; weight decay on convolution kernels only, as in the study."""
    decayed, plain = [], []
    for module in (network, task):
        for param in module.parameters():
            if param.requires_grad:
                (decayed if param.ndim == 4 else plain).append(param)
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}],
        lr=0.0,
        momentum=config.momentum,
    )


class PretextModel(nn.Module):
    """Network and task head as one module, so DistributedDataParallel sees every parameter."""

    def __init__(self, network: nn.Module, task: PretextTask) -> None:
        super().__init__()
        self.network = network
        self.task = task

    def forward(self, inputs: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.task(self.network(inputs)["pre_logits"], context)


@dataclass
class PlacedModel:
    """A run's network, head, (DDP-wrapped, compiled) model and optimizer on its training device."""

    network: nn.Module
    task: PretextTask
    model: nn.Module
    compiled: nn.Module
    optimizer: torch.optim.SGD
    dtype: torch.dtype
    channels_last: bool
    autocast_dtype: torch.dtype | None


def place_model(config: TrainConfig, device: torch.device, dist: DistributedContext) -> PlacedModel:
    """The model of a resolved config on ``device``, seeded, set up for this process's place in the job."""
    torch.manual_seed(config.seed)
    network, task = build_model(config)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if config.sync_bn and dist.enabled:
        network = convert_sync_batchnorm(network, device.type)
        task = convert_sync_batchnorm(task, device.type)
    # fp64 is for exactness checks (e.g. one process against several): float32 roundoff is
    # amplified enormously by a deep BatchNorm network's first steps.
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    network.to(device, dtype=dtype, memory_format=memory_format)
    task.to(device, dtype=dtype)
    model: nn.Module = PretextModel(network, task)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    compiled = torch.compile(model) if config.compile else model
    optimizer = optimizer_for(network, task, config)
    precision = config.precision
    autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
    return PlacedModel(network, task, model, compiled, optimizer, dtype, channels_last, autocast_dtype)


def load_trained_identity(
    run_dir: str | Path, device: torch.device | str = "cpu"
) -> tuple[TrainConfig, nn.Module, PretextTask, CheckpointIdentity]:
    """load_trained's network and head together with the identity of the very checkpoint they come from."""
    config = load_config(run_dir)
    state, identity = load_checkpoint(run_dir, map_location=device)
    assert state is not None
    network, task = build_model(config)
    network.load_state_dict(state["network"])
    task.load_state_dict(state["task"])
    return config, network.to(device).eval(), task.to(device).eval(), identity


def load_trained(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, nn.Module, PretextTask]:
    """The config, network and task head of a run, with the weights of its last (loadable) checkpoint."""
    config, network, task, _ = load_trained_identity(run_dir, device)
    return config, network, task
