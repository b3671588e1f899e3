"""torch.hub entry points: the study's networks, trained (a run directory or an export) or at random init.

    torch.hub.load(REPO_DIR, "revnet50", run="runs/rot", source="local")            # a run's last checkpoint
    torch.hub.load(REPO_DIR, "revnet50", weights="rot.safetensors", source="local") # pretextlab export --format safetensors
    torch.hub.load(REPO_DIR, "resnet50v2", width=2, final_relu=False, source="local") # random init

One entry per network family; each returns the network (a dict of named outputs per forward:
block1.., pre_logits), in eval mode when trained weights are loaded.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# torch.hub checks these are importable before calling an entry point (they are pretextlab's own).
dependencies = ["torch", "torchvision", "numpy", "safetensors"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "pretextlab")) and _SRC not in sys.path:
    # The checkout's own package, also where it is not pip-installed (src layout).
    sys.path.insert(0, _SRC)


def _load(name: str, run: str | None, weights: str | None, width: int | None, options: dict[str, Any]) -> Any:
    from pretextlab.errors import PretextlabError
    from pretextlab.models import build_network, load_exported

    if run is not None and weights is not None:
        raise PretextlabError("give run= (a train run directory) or weights= (an exported .safetensors file), not both")
    if run is None and weights is None:
        return build_network(name, width, **options)
    if width is not None or options:
        given = ", ".join(["width"] * (width is not None) + sorted(options))
        raise PretextlabError(f"{given}: the network's shape comes from {'run' if run else 'weights'}= (its recorded config); drop these")
    if run is not None:
        from pretextlab.training import load_trained

        _, network, _ = load_trained(run)
    else:
        network = load_exported(weights)  # type: ignore[arg-type]
    if network.name != name:
        raise PretextlabError(
            f"{run or weights} holds a {network.name}, not a {name}: load it with torch.hub.load(REPO_DIR, {network.name!r}, ...)"
        )
    return network


def resnet50v1(run: str | None = None, weights: str | None = None, width: int | None = None, **options: Any) -> Any:
    """ResNet50 v1: trained (``run=`` a run directory, ``weights=`` a safetensors export) or at random init
    (``width``, and ``build_network``'s other options)."""
    return _load("resnet50v1", run, weights, width, options)


def resnet50v2(run: str | None = None, weights: str | None = None, width: int | None = None, **options: Any) -> Any:
    """ResNet50 v2 (``final_relu=False``: the "(-)" variant); arguments as for resnet50v1."""
    return _load("resnet50v2", run, weights, width, options)


def revnet50(run: str | None = None, weights: str | None = None, width: int | None = None, **options: Any) -> Any:
    """RevNet50 (``final_relu=False``: the "(-)" variant); arguments as for resnet50v1."""
    return _load("revnet50", run, weights, width, options)


def vgg19bn(run: str | None = None, weights: str | None = None, width: int | None = None, **options: Any) -> Any:
    """VGG19-BN (``input_size``: the square input side it is built for, default 224); arguments as for resnet50v1."""
    return _load("vgg19bn", run, weights, width, options)
