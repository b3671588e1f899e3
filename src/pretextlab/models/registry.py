"""The network contract (``Network``) and registry: ``register_network``, ``network_info``, ``build_network``.

Every network is an ``nn.Module`` whose ``forward`` returns a dict of named outputs in network
order (ResNet/RevNet: block1..block4, pre_logits; VGG: block1..block5, fc6, pre_logits), so a task
reads ``pre_logits`` and a probe names the output it reads without touching the internals.

A family module (resnet.py, revnet.py, vgg.py) subclasses ``Network`` and registers each of its
constructors with ``@register_network(name, ...)``, declaring its outputs and variants as metadata
(``pretextlab.registry.NetworkInfo``), as torchvision's ``models/_api.py`` and timm's
``feature_info`` do. This module imports no family: ``pretextlab.models`` imports them, so they
have registered before anything can be looked up (any import of this module runs the package first).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from pretextlab.errors import PretextlabError
from pretextlab.registry import NetworkInfo, Registry

NETWORK_REGISTRY: Registry[Callable[..., "Network"]] = Registry("network", NetworkInfo)

BN_INITS = ("released", "pytorch")
# TensorFlow's defaults, which the released code keeps wherever it sets nothing (released code,
# models/resnet.py:44-45 and models/vggnet.py:32 call tf.layers.batch_normalization without
# momentum or epsilon: decay 0.99, epsilon 1e-3; models/vggnet.py:30 and resnet.py's convs pass no
# kernel_initializer: glorot-uniform). PyTorch's momentum is 1 - TF's decay.
RELEASED_BN_MOMENTUM = 0.01
RELEASED_BN_EPS = 1e-3


def register_network(name: str, **metadata: Any) -> Callable[[Callable[..., "Network"]], Callable[..., "Network"]]:
    """Decorator for a network constructor ``f(width, **options) -> Network``; ``metadata`` are the
    fields of ``NetworkInfo`` (title, outputs, default_width, has_final_relu_variant, ...)."""
    return NETWORK_REGISTRY.register(name, **metadata)


def network_names() -> tuple[str, ...]:
    """The registered networks, in registration order."""
    return NETWORK_REGISTRY.names()


def network_info(name: str) -> NetworkInfo:
    """What network ``name`` declares (outputs, default width, variants), without building it."""
    return NETWORK_REGISTRY.metadata(name)


def check_final_relu(name: str, final_relu: bool) -> None:
    """The one place of the "(-)" rule: final_relu=False only where the network declares that variant."""
    info = network_info(name)
    if not final_relu and not info.has_final_relu_variant:
        having = ", ".join(n for n in network_names() if network_info(n).has_final_relu_variant)
        raise PretextlabError(
            f"final_relu=False (--no-final-relu, the '(-)' variant) does not exist for {name}: "
            f"{info.no_final_relu_variant_because}; it exists for {having}"
        )


@dataclass(frozen=True)
class NetworkShape:
    """The options every network is built with (``build_network`` documents each): one definition
    that every family's constructor and ``Network`` take, instead of each repeating the list."""

    width: int
    final_relu: bool = True
    patch_mode: bool = False
    representation_size: int | None = None
    input_size: int | None = None


class Network(nn.Module):
    """What every network of the study offers besides its layers.

    Attributes: ``name`` (registry name), ``width`` (widening factor k), ``patch_mode``,
    ``final_relu``, ``representation_size`` (None or D), ``input_size`` (None where any size
    works), ``output_names`` (the keys ``forward`` returns, in order) and ``out_dim`` (the size of
    the flat ``pre_logits``).
    """

    output_names: tuple[str, ...]

    def __init__(self, name: str, shape: NetworkShape) -> None:
        super().__init__()
        self.name = name
        self.width = shape.width
        self.final_relu = shape.final_relu
        self.patch_mode = shape.patch_mode
        self.representation_size = shape.representation_size
        self.input_size = shape.input_size
        self.out_dim = 0  # set by the family once its natural pre-logits size is known
        self.representation: nn.Linear | None = None

    def _add_representation_layer(self, natural_dim: int) -> None:
        """The representation-size experiment's layer: natural pre-logits (natural_dim) -> D.

        A bias-free linear map, no normalisation or ReLU after it, so pre_logits is a linear
        function of the pooled features as in the study. Initialised N(0, 1/natural_dim), which
        keeps the pre_logits at the scale of the pooled features whatever D is.
        """
        if self.representation_size is None:
            self.out_dim = natural_dim
            return
        self.representation = nn.Linear(natural_dim, self.representation_size, bias=False)
        self.out_dim = self.representation_size

    def _pre_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.representation is None else self.representation(features)

    def _init_weights(self) -> None:
        """torchvision's initialisation: convs kaiming-normal (fan_out, ReLU), BN weight 1 bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.representation is not None:
            nn.init.normal_(self.representation.weight, std=self.representation.in_features**-0.5)

    def use_bn_init(self, scheme: str) -> None:
        """``released``: every BatchNorm at TF's defaults (momentum 0.01, eps 1e-3) and every conv
        kernel re-drawn glorot-uniform; ``pytorch``: as built (momentum 0.1, eps 1e-5, kaiming-normal)."""
        if scheme not in BN_INITS:
            raise PretextlabError(f"unknown BatchNorm/init scheme {scheme!r} (--bn-init): choose one of {', '.join(BN_INITS)}")
        if scheme == "pytorch":
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum, module.eps = RELEASED_BN_MOMENTUM, RELEASED_BN_EPS

    def _check_input(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise PretextlabError(
                f"{self.name} takes a 4-d float tensor (batch, 3, height, width), got {shape}: "
                "add the batch dimension with images.unsqueeze(0) for a single image"
            )
        if images.shape[1] != 3:
            raise PretextlabError(
                f"{self.name} takes 3-channel (RGB) images, got {images.shape[1]} channels in shape "
                f"{tuple(images.shape)}: repeat gray images with images.expand(-1, 3, -1, -1)"
            )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, width={self.width}, final_relu={self.final_relu}, "
            f"patch_mode={self.patch_mode}, out_dim={self.out_dim}"
        )


def _positive_int(value: object, what: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise PretextlabError(f"{what} must be an integer >= 1, got {value!r}: {hint}")
    return int(value)


def build_network(
    name: str,
    width: int | None = None,
    final_relu: bool = True,
    patch_mode: bool = False,
    representation_size: int | None = None,
    input_size: int | None = None,
    reversible_backward: bool | None = None,
    reversible_check: bool = False,
    bn_init: str | None = None,
) -> Network:
    """The registered network ``name`` at widening factor ``width`` (default: its declared one, 4, VGG 8).

    ``final_relu=False`` is the study's "(-)" variant (where declared: resnet50v2, revnet50).
    ``patch_mode`` is the Jigsaw / Relative Patch Location geometry for 64x64 patches.
    ``representation_size`` inserts a linear layer so pre_logits has that many dimensions.
    ``input_size`` is the input side; VGG needs it (fc6's kernel covers the remaining map),
    default 224, or 64 in patch mode.
    ``reversible_backward`` (networks declaring ``supports_reversible_backward``: revnet50; None = on) backpropagates through RevNet's stages by
    recomputing activations instead of storing them (models/reversible.py): same gradients,
    activation memory independent of depth. ``reversible_check`` (revnet50 only) measures that
    recomputation's error in every backward and warns past a tolerance (costs the saved memory).
    ``bn_init`` "released" (TF's BatchNorm momentum/eps, glorot-uniform convs; ``Network.use_bn_init``)
    or "pytorch" (None: PyTorch's defaults, kaiming-normal convs, as runs recorded before the option).
    """
    constructor = NETWORK_REGISTRY.get(name)
    info = network_info(name)
    width = info.default_width if width is None else _positive_int(
        width, "width", "the widening factor k is a whole number (the study uses 4, 8, 12, 16)"
    )
    check_final_relu(name, final_relu)
    if bn_init is not None and bn_init not in BN_INITS:
        raise PretextlabError(f"unknown BatchNorm/init scheme {bn_init!r} (--bn-init): choose one of {', '.join(BN_INITS)}")
    reversible_options: dict[str, bool] = {}
    for option, value in (("reversible_backward", reversible_backward), ("reversible_check", reversible_check)):
        if value is not None and not isinstance(value, bool):
            raise PretextlabError(f"{option} must be True or False, got {value!r}")
        if info.supports_reversible_backward:
            if value is not None:
                reversible_options[option] = value
        elif value:
            reversible = ", ".join(n for n in network_names() if network_info(n).supports_reversible_backward)
            raise PretextlabError(
                f"{option}=True is for networks of reversible units ({reversible}), "
                f"not {name}: {name} must store its activations for backprop; drop the option"
            )
    if representation_size is not None:
        representation_size = _positive_int(
            representation_size, "representation_size", "use None for the natural pre-logits size, or e.g. 2048"
        )
    if input_size is not None:
        input_size = _positive_int(input_size, "input_size", "give the side of the square network input in pixels")
    network = constructor(
        width=width,
        final_relu=bool(final_relu),
        patch_mode=bool(patch_mode),
        representation_size=representation_size,
        input_size=input_size,
        **reversible_options,
    )
    network.use_bn_init("pytorch" if bn_init is None else bn_init)
    return network


def parameter_count(name: str, width: int | None = None, **options: object) -> int:
    """Number of parameters of ``build_network(name, width, **options)``, built on the meta
    device so that even k=16 networks cost no memory or time."""
    with torch.device("meta"):
        network = build_network(name, width, **options)  # type: ignore[arg-type]
    return sum(p.numel() for p in network.parameters())


def networks_table(widths: tuple[int, ...] = (4, 8, 12, 16)) -> str:
    """A Markdown table of every network (and "(-)" variant) at ``widths``: parameters, pre-logits."""
    widths = tuple(_positive_int(w, "every width", "widths are widening factors such as 4, 8, 12, 16") for w in widths)
    if not widths:
        raise PretextlabError("widths is empty: give at least one widening factor, e.g. (4, 8, 12, 16)")
    variants: list[tuple[str, str, bool]] = []
    for name in network_names():
        variants.append((name, name, True))
        if network_info(name).has_final_relu_variant:
            variants.append((f"{name} (-)", name, False))
    lines = ["| network | k | parameters | pre-logits |", "|---|---:|---:|---:|"]
    for label, name, final_relu in variants:
        for width in widths:
            with torch.device("meta"):
                network = build_network(name, width, final_relu=final_relu)
            parameters = sum(p.numel() for p in network.parameters())
            lines.append(f"| {label} | {width} | {parameters:,} | {network.out_dim:,} |")
    lines.append("")
    lines.append(
        "Parameters exclude any task head. VGG19-BN is counted at 224x224 input (fc6 is a 7x7 conv); "
        "\"(-)\" = no ReLU before global pooling (same parameters)."
    )
    return "\n".join(lines) + "\n"
