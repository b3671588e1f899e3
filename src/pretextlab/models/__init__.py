"""The study's networks (ResNet50 v1/v2, RevNet50, VGG19-BN) at any widening factor k.

    network = build_network("revnet50", width=16)
    outputs = network(images)            # {"block1": ..., ..., "block4": ..., "pre_logits": (B, 512k)}

See registry.py for the contract, one file per family for the layers, and torchvision_convert.py
for weights to and from torchvision.
"""

from pretextlab.models.registry import (
    DEFAULT_WIDTHS,
    NETWORKS,
    Network,
    build_network,
    networks_table,
    parameter_count,
)
from pretextlab.models.resnet import ResNet50
from pretextlab.models.revnet import RevNet50, ReversibleUnit, batch_stats_without_update
from pretextlab.models.vgg import VGG19BN

__all__ = [
    "DEFAULT_WIDTHS",
    "NETWORKS",
    "Network",
    "ResNet50",
    "RevNet50",
    "ReversibleUnit",
    "VGG19BN",
    "batch_stats_without_update",
    "build_network",
    "networks_table",
    "parameter_count",
]
