"""The study's networks (ResNet50 v1/v2, RevNet50, VGG19-BN) at any widening factor k, by name.

    network = build_network("revnet50", width=16)
    outputs = network(images)            # {"block1": ..., ..., "block4": ..., "pre_logits": (B, 512k)}
    network_info("vgg19bn").outputs      # declared metadata: no network is built to read it

See registry.py for the contract and the registry, one file per family for the layers (each
registers itself with ``@register_network``), torchvision_convert.py for weights to and from
torchvision, and export.py for exported files (``export_network``, ``load_exported``).
"""

from pretextlab.models.registry import (
    NETWORK_REGISTRY,
    Network,
    NetworkShape,
    build_network,
    check_final_relu,
    network_info,
    network_names,
    networks_table,
    parameter_count,
    register_network,
)

# Imported for their registrations (each family module registers its constructors on import).
from pretextlab.models.resnet import ResNet50  # noqa: E402
from pretextlab.models.revnet import RevNet50, ReversibleUnit, batch_stats_without_update  # noqa: E402
from pretextlab.models.vgg import VGG19BN  # noqa: E402
from pretextlab.models.export import EXPORT_FORMATS, export_network, load_exported  # noqa: E402

NETWORKS: tuple[str, ...] = network_names()
DEFAULT_WIDTHS: dict[str, int] = {name: network_info(name).default_width for name in NETWORKS}

__all__ = [
    "DEFAULT_WIDTHS",
    "EXPORT_FORMATS",
    "NETWORKS",
    "NETWORK_REGISTRY",
    "Network",
    "NetworkShape",
    "ResNet50",
    "RevNet50",
    "ReversibleUnit",
    "VGG19BN",
    "batch_stats_without_update",
    "build_network",
    "check_final_relu",
    "export_network",
    "load_exported",
    "network_info",
    "network_names",
    "networks_table",
    "parameter_count",
    "register_network",
]
