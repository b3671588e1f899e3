"""Exported weights: a network in torchvision's, timm's or this package's own (safetensors) layout, and loading one back.

    export_network(network, "torchvision", "resnet50.pth", provenance)   # torchvision resnet50 keys
    export_network(network, "timm", "resnet50.safetensors", provenance)  # timm resnet50 keys
    export_network(network, "safetensors", "revnet50.safetensors", provenance)
    network = load_exported("revnet50.safetensors")                      # the same network, eval mode

Where torchvision or timm has the architecture (resnet50v1 at k=4 = ``resnet50``; vgg19bn at k=8
= ``vgg19_bn``'s ``features``) the weights take that library's entry names (torchvision_convert.py)
and BatchNorm is re-expressed for its epsilon; the tensors go in a torch.save'd dict (``.pth``)
or, if the file name ends in ``.safetensors``, a safetensors file. ``safetensors`` is every
network in its own names, with the arguments that rebuild it in the file's metadata. Beside each
file, ``<file name>.json`` (also in a safetensors file's metadata under "pretextlab") records the
network, the target and what is left out of it, and the provenance given (pretextlab export
passes the run and its checkpoint's step and SHA-256). Both files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pretextlab import atomic
from pretextlab.errors import PretextlabError
from pretextlab.models.registry import RELEASED_BN_EPS, RELEASED_BN_MOMENTUM, Network, build_network
from pretextlab.models.torchvision_convert import resnet50v1_to_torchvision, vgg19bn_to_torchvision

EXPORT_FORMATS = ("torchvision", "timm", "safetensors")
EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "pretextlab"  # the safetensors metadata entry holding the export record (JSON)
TARGET_BN_EPS = 1e-5  # nn.BatchNorm2d's default, which torchvision's and timm's networks keep


@dataclass(frozen=True)
class Target:
    """A library model that one of our networks (at one width) maps onto entry for entry."""

    model: str  # the library's name for it
    network: str
    width: int
    convert: Callable[..., dict[str, torch.Tensor]]
    left_out: str  # the library model's entries with no counterpart here, and why
    load: str  # how to load the file (FILE stands for its path)


_RESNET_LEFT_OUT = "fc (the classifier: the pretext task owns the head)"
_VGG_LEFT_OUT = (
    "the classifier / pre_logits head: the study's fc6/fc7 are bias-free convs followed by BatchNorm, the "
    "library's are biased layers without it (export the whole network with --format safetensors)"
)
TARGETS: dict[tuple[str, str], Target] = {
    ("torchvision", "resnet50v1"): Target(
        "resnet50", "resnet50v1", 4, resnet50v1_to_torchvision, _RESNET_LEFT_OUT,
        "model = torchvision.models.resnet50(); model.load_state_dict(torch.load(FILE), strict=False); "
        "model.fc = torch.nn.Identity()",
    ),
    ("torchvision", "vgg19bn"): Target(
        "vgg19_bn", "vgg19bn", 8, vgg19bn_to_torchvision, _VGG_LEFT_OUT,
        "model = torchvision.models.vgg19_bn(); model.load_state_dict(torch.load(FILE), strict=False); "
        "features = model.features",
    ),
    ("timm", "resnet50v1"): Target(
        "resnet50", "resnet50v1", 4, resnet50v1_to_torchvision, _RESNET_LEFT_OUT,
        'model = timm.create_model("resnet50", num_classes=0, checkpoint_path=FILE)',
    ),
    ("timm", "vgg19bn"): Target(
        "vgg19_bn", "vgg19bn", 8, vgg19bn_to_torchvision, _VGG_LEFT_OUT,
        'model = timm.create_model("vgg19_bn", num_classes=0); model.load_state_dict(torch.load(FILE), strict=False); '
        "features = model.features",
    ),
}


def _bn_init_of(network: nn.Module) -> str:
    """The ``bn_init`` scheme a network was built with, read from its BatchNorms (a state dict does
    not hold their momentum and epsilon, so the export must name the scheme that rebuilds them)."""
    settings = {(m.momentum, m.eps) for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if settings <= {(RELEASED_BN_MOMENTUM, RELEASED_BN_EPS)}:
        return "released" if settings else "pytorch"
    if settings == {(0.1, 1e-5)}:
        return "pytorch"
    raise PretextlabError(
        f"the network's BatchNorm momentum/eps {sorted(settings)} are neither PyTorch's (0.1, 1e-5) nor the released "
        f"recipe's ({RELEASED_BN_MOMENTUM}, {RELEASED_BN_EPS}): build it with build_network(..., bn_init=...)"
    )


def network_spec(network: Network) -> dict[str, Any]:
    """The ``build_network`` arguments that rebuild ``network`` (its weights aside)."""
    if not isinstance(network, Network):
        raise PretextlabError(f"only this package's networks export, got {type(network).__name__}")
    return {
        "name": network.name,
        "width": network.width,
        "final_relu": network.final_relu,
        "patch_mode": network.patch_mode,
        "representation_size": network.representation_size,
        "input_size": network.input_size,
        "bn_init": _bn_init_of(network),
    }


def _target(network: Network, fmt: str) -> Target:
    """The library model ``network`` exports to in format ``fmt``, or one error naming those that exist."""
    target = TARGETS.get((fmt, network.name))
    supported = " and ".join(f"{t.network} at width {t.width} ({t.model})" for (f, _), t in TARGETS.items() if f == fmt)
    problem = None
    if target is None:
        problem = f"{network.name} has no {fmt} counterpart"
    elif network.width != target.width:
        problem = f"{network.name} at width {network.width} has no {fmt} counterpart"
    elif network.patch_mode:
        problem = f"this {network.name} was built for patches (stem stride 1, last stage unstrided), unlike {fmt}'s {target.model}"
    elif network.representation is not None:
        problem = f"this {network.name} has a representation layer (representation_size={network.representation_size})"
    if problem is not None:
        raise PretextlabError(
            f"{problem}: --format {fmt} exports {supported}; use --format safetensors, which exports any network "
            "(loaded back with pretextlab.models.load_exported)"
        )
    assert target is not None
    return target


def record_path(out: str | Path) -> Path:
    """Where the record of the export written to ``out`` goes: beside it, ``<file name>.json`` (so
    model.pth and model.safetensors keep records of their own)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _check_out(out: Path, fmt: str) -> None:
    if fmt == "safetensors" and out.suffix != ".safetensors":
        raise PretextlabError(f"--format safetensors writes a safetensors file: name --out with .safetensors (e.g. {out.with_suffix('.safetensors')})")
    if out.is_dir():
        raise PretextlabError(f"--out {out} is a directory: give a file name, e.g. {out / ('model.safetensors' if fmt == 'safetensors' else 'model.pth')}")


def export_network(
    network: Network, fmt: str, out: str | Path, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``network``'s weights to ``out`` in format ``fmt`` (EXPORT_FORMATS), and its record to
    ``record_path(out)``; returns the record. ``provenance`` (JSON-able: the run, its
    checkpoint's identity) is stored in the record as given."""
    if fmt not in EXPORT_FORMATS:
        raise PretextlabError(f"unknown export format {fmt!r} (--format): choose one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    _check_out(out, fmt)
    spec = network_spec(network)
    record: dict[str, Any] = {"export_format_version": EXPORT_FORMAT_VERSION, "format": fmt, "network": spec}
    if fmt == "safetensors":
        tensors = network.state_dict()
        record["load"] = "pretextlab.models.load_exported(FILE)"
    else:
        target = _target(network, fmt)
        tensors = target.convert(network, bn_eps=TARGET_BN_EPS)
        record["target"] = {"library": fmt, "model": target.model, "left_out": target.left_out,
                            "bn_eps": TARGET_BN_EPS, "bn_eps_of_network": RELEASED_BN_EPS if spec["bn_init"] == "released" else 1e-5}
        record["load"] = target.load
    record["container"] = "safetensors" if out.suffix == ".safetensors" else "torch"
    record["provenance"] = dict(provenance or {})
    # Detached, contiguous copies: safetensors refuses views, and no caller's module is aliased.
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    try:
        json.dumps(record)
    except TypeError as error:
        raise PretextlabError(f"the export's provenance must be JSON data: {error}") from None
    try:
        if record["container"] == "safetensors":
            from safetensors.torch import save

            data = save(tensors, metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
            atomic.write_bytes(out, lambda handle: handle.write(data))
        else:
            atomic.save_torch(out, tensors)
        atomic.write_json(record_path(out), record)
    except OSError as error:
        raise PretextlabError(f"could not write {out}: {error.strerror or error}; choose a writable --out") from None
    return record


def read_export_record(path: str | Path) -> dict[str, Any]:
    """The record a safetensors export carries in its metadata (what ``export_network`` returned)."""
    path = Path(path)
    if not path.is_file():
        raise PretextlabError(f"{path} is not a file: pass the --out of pretextlab export")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types on a file that is not one
        raise PretextlabError(
            f"{path} is not a safetensors file ({type(error).__name__}: {str(error)[:120]}): "
            "export the run with pretextlab export RUN --format safetensors --out FILE.safetensors"
        ) from None
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        raise PretextlabError(
            f"{path} has no pretextlab record in its metadata: it was not written by pretextlab export"
        ) from None
    version = record.get("export_format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise PretextlabError(f"{path} has export format version {version!r}, newer than this pretextlab reads: upgrade pretextlab")
    return record


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """The network a ``--format safetensors`` export holds, with its weights, in eval mode."""
    record = read_export_record(path)
    if record.get("format") != "safetensors":
        target = record.get("target", {})
        raise PretextlabError(
            f"{path} holds {record.get('format')}'s {target.get('model')} layout, not this package's: load it with "
            f"{record.get('load')}"
        )
    from safetensors.torch import load_file

    network = build_network(**record["network"])
    network.load_state_dict(load_file(str(path), device=str(device)))
    return network.to(device).eval()
