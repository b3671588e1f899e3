"""The network and task head a config describes, their optimizer, and a trained run's weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretextlab.config import TrainConfig, task_options
from pretextlab.devices import resolve_device  # shared with evaluation; re-exported by training
from pretextlab.errors import PretextlabError
from pretextlab.models import build_network, network_info
from pretextlab.models.revnet import RevNetStem
from pretextlab.tasks import PretextTask, build_task, task_class
from pretextlab.tasks.patches import PatchClassifierHead
from pretextlab.training.checkpoint import CheckpointIdentity, load_checkpoint
from pretextlab.training.distributed import DistributedContext, convert_sync_batchnorm
from pretextlab.training.run_dir import load_config


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


# Issue 16 item 3, docs/protocol.md#weight-decay. The released code regularises kernels only (every
# ``kernel_regularizer``; no bias, BatchNorm or other tensor) and adds the sum to the loss
# (released: trainer.py:94-96). tf.contrib's l2_regularizer(scale) is scale * sum(w**2) / 2, whose
# gradient scale * w is exactly SGD's ``weight_decay``, so the factors carry over unchanged.
# Kernels inside these module types leave the --weight-decay group (RELEASED_DECAY_OVERRIDES):
# - RevNet's stem: its 7x7 conv is built with kernel_regularizer=None (released: models/resnet.py:333-337);
# - the patch tasks' two-layer head, fully_connected(weight_decay=5e-4) with its own regulariser on
#   both layers whatever the flag says (released: self_supervision/patch_utils.py:178-207, the
#   factor at 180, the regulariser at 186).
# Everything else that is a kernel takes --weight-decay: the network's convs and fc layers
# (models/resnet.py:192,200,214; models/vggnet.py:45-49, the flag's 1e-4 reaching VGG through
# models/utils.py:58-60) and the task's logits / embedding layer, which the released networks
# build as their last conv with the same regulariser (models/resnet.py:258-260, 386-388;
# models/vggnet.py:88-89). The project's --representation-size layer is such a kernel too.
KERNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PATCH_HEAD_WEIGHT_DECAY = 5e-4  # released: self_supervision/patch_utils.py:180, not the --weight_decay flag
# Module types whose kernels leave the --weight-decay group in the released scope, and the group they join.
RELEASED_DECAY_OVERRIDES: tuple[tuple[type[nn.Module], str], ...] = (
    (RevNetStem, "none"),
    (PatchClassifierHead, "patch-head"),
)


@dataclass
class WeightDecayGroup:
    """One parameter group of the optimizer: its role, factor and tensors (``names`` as
    "network.<parameter name>" / "task.<parameter name>", in ``params`` order)."""

    role: str  # released: "kernels", "patch-head", "none"; conv-kernels: "conv-kernels", "none"
    weight_decay: float
    names: list[str]
    params: list[nn.Parameter]


def _released_roles(root: nn.Module) -> dict[int, str]:
    """id(kernel) -> "kernels" / "patch-head" / "none" for every kernel under ``root``; a module
    inherits the override of the nearest enclosing module that has one."""
    roles: dict[int, str] = {}

    def visit(module: nn.Module, role: str) -> None:
        for kind, override in RELEASED_DECAY_OVERRIDES:
            if isinstance(module, kind):
                role = override
        if isinstance(module, KERNEL_LAYERS):
            roles[id(module.weight)] = role
        for child in module.children():
            visit(child, role)

    visit(root, "kernels")
    return roles


def weight_decay_groups(network: nn.Module, task: nn.Module, config: TrainConfig) -> list[WeightDecayGroup]:
    """The optimizer's parameter groups under ``config.weight_decay_scope``.

    "released" (the default for folder datasets; the rules above): "kernels" at --weight-decay,
    "patch-head" at 5e-4, "none" at 0, in that order, empty groups left out. "conv-kernels" (and None:
    a run recorded before the option): the project's earlier rule, every 4-d tensor at --weight-decay,
    everything else at 0, always these two groups in this order, so old checkpoints' optimizer states
    load and resume as they were trained.
    """
    trainable = [
        (f"{prefix}.{name}", param)
        for prefix, module in (("network", network), ("task", task))
        for name, param in module.named_parameters()
        if param.requires_grad
    ]
    scope = config.weight_decay_scope or "conv-kernels"
    if scope == "conv-kernels":
        groups = [WeightDecayGroup("conv-kernels", config.weight_decay, [], []), WeightDecayGroup("none", 0.0, [], [])]
        role_of = {id(p): ("conv-kernels" if p.ndim == 4 else "none") for _, p in trainable}
    elif scope == "released":
        groups = [
            WeightDecayGroup("kernels", config.weight_decay, [], []),
            WeightDecayGroup("patch-head", PATCH_HEAD_WEIGHT_DECAY, [], []),
            WeightDecayGroup("none", 0.0, [], []),
        ]
        role_of = {**_released_roles(network), **_released_roles(task)}
    else:
        raise PretextlabError(f"--weight-decay-scope must be released or conv-kernels, got {scope!r}")
    by_role = {g.role: g for g in groups}
    for name, param in trainable:
        group = by_role[role_of.get(id(param), "none")]  # biases, BatchNorm: no decay in either scope
        group.names.append(name)
        group.params.append(param)
    return [g for g in groups if g.params or scope == "conv-kernels"]


def optimizer_for(network: nn.Module, task: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Momentum SGD with the weight-decay groups of ``config.weight_decay_scope`` (``weight_decay_groups``)."""
    groups = weight_decay_groups(network, task, config)
    return torch.optim.SGD(
        [{"params": g.params, "weight_decay": g.weight_decay} for g in groups], lr=0.0, momentum=config.momentum
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
