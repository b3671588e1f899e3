"""Any torchvision or timm network as a frozen backbone for the study's probes (``evaluate --backbone``).

A backbone is named ``torchvision:NAME`` or ``timm:NAME`` and built at random init (seeded) or
with a state_dict saved locally (``--weights``): nothing is ever downloaded. Its named outputs
are graph nodes taken with torchvision's ``create_feature_extractor`` or, for timm, the modules of
the model's ``feature_info`` (the stages ``features_only=True`` returns), plus ``pre_logits``:
the input of torchvision's last Linear layer, timm's ``forward_head(pre_logits=True)``. From there
it goes the way a run's network goes (probe_run.probe_representation): the study's pooling rule,
the same probes, the same feature cache and stored result files, in ``--out`` instead of a run.

Provenance: a backbone's identity (the name, the library's version, and the weights file's
SHA-256 or "random-init" with its seed) stands where a run's checkpoint identity stands, in the
feature cache key, in every result's recipe hash and in its ``checkpoint`` record.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pretextlab.data import augment
from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.augmented import random_crops
from pretextlab.evaluate.probe_run import FEATURES_DIR, PROBES_DIR, EvalConfig, Log, _stderr, downstream_splits, probe_representation
from pretextlab.evaluate.result_files import content_key, dataset_tag, store_results
from pretextlab.options import option

LIBRARIES = ("torchvision", "timm")
# torchvision's ImageNet weights all expect this input (their transforms' mean/std); timm's come from pretrained_cfg.
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_CROP_PCT = 0.875  # torchvision's ImageNet eval: resize 256, centre crop 224
PRE_LOGITS = "pre_logits"


@dataclass(frozen=True)
class BackboneSpec:
    """Which model-zoo network `evaluate` probes instead of a run; each field is an `evaluate` flag."""

    backbone: str | None = option(
        None, "probe a model-zoo network instead of --run: torchvision:NAME or timm:NAME, random init unless --weights "
        "(default: none, --run names what is probed)",
        metavar="LIB:NAME", section="network")
    weights: str | None = option(
        None, "--backbone: a state_dict saved on this machine (torch.save .pth/.pt, or .safetensors); nothing is "
        "downloaded (default: random init)", metavar="FILE", section="network")
    init_seed: int = option(0, "--backbone without --weights: the seed of the random init", section="network")
    image_size: int | None = option(
        None, "--backbone: input side in pixels (default: the model's own, 224 for torchvision, timm's pretrained_cfg)",
        metavar="PX", section="network")
    resize_size: int | None = option(
        None, "--backbone with --dataset folder: the side, in pixels, files' shorter side is resized to before the "
        "centre crop of --image-size; the weights' own eval transform says it, a state_dict cannot (torchvision "
        "IMAGENET1K_V2: weights.transforms() gives 232 for 224) (default: the library's own rule, floor(image size / "
        "crop fraction): torchvision 0.875, timm's pretrained_cfg crop_pct)", metavar="PX", section="network")
    out: str | None = option(
        None, "--backbone: the directory for its feature cache and results (default: backbones/LIB-NAME)",
        metavar="DIR", section="network")

    def parsed(self) -> tuple[str, str]:
        """(library, model name) of ``backbone``, or a clear error."""
        library, _, name = (self.backbone or "").partition(":")
        if library not in LIBRARIES or not name:
            raise PretextlabError(
                f"--backbone {self.backbone!r}: write LIB:NAME with LIB one of {', '.join(LIBRARIES)}, e.g. "
                "torchvision:resnet50 or timm:resnet18"
            )
        return library, name

    def out_dir(self) -> Path:
        library, name = self.parsed()
        return Path(self.out) if self.out else Path("backbones") / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{library}-{name}")


@dataclass
class Backbone:
    """A built backbone: the model (weights loaded), how to take its outputs, its input and its identity."""

    name: str
    model: nn.Module
    default_outputs: tuple[str, ...]
    make_network: Callable[[tuple[str, ...]], nn.Module]  # requested outputs -> a network returning them as a dict
    known: Callable[[str], bool]  # whether an output name exists
    list_hint: str  # how a user lists every output name
    image_size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: dict[str, Any]

    def input_recipe(self, decode_size: int, dataset: str) -> dict[str, Any]:
        """How images become the backbone's input, recorded with every result."""
        # Folder files are decoded to RGB whatever their mode (data/folder.py); Fashion-MNIST is grey.
        channels = "RGB, any file mode converted" if dataset == "folder" else "grey images replicated to 3 channels"
        return {"image_size": self.image_size, "decode_size": decode_size, "crop": "centre", "mean": list(self.mean),
                "std": list(self.std), "channels": channels}


class _Outputs(nn.Module):
    """A backbone as this project's networks are: forward returns a dict of named outputs."""

    def __init__(self, forward: Callable[[torch.Tensor], dict[str, torch.Tensor]], parts: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.parts = parts
        self._forward = forward
        self.output_names = names
        self.eval()  # built frozen: BatchNorm's running statistics, no dropout (extraction restores this mode)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._forward(x)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a weights file, read in 1 MiB blocks (an ImageNet ResNet-50 is ~100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_hint(library: str, name: str) -> str:
    if library == "torchvision":
        save = (f"torch.save(torchvision.models.get_model('{name}', weights='DEFAULT').state_dict(), '{name}.pth')")
        return f"on a machine with internet run python -c \"import torch, torchvision; {save}\""
    return (f"on a machine with internet run python -c \"import torch, timm; "
            f"torch.save(timm.create_model('{name}', pretrained=True).state_dict(), '{name}.pth')\"")


def _read_state_dict(path: Path, library: str, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        # A weights enum name or a URL would need a download, which these machines cannot do.
        raise PretextlabError(
            f"--weights {path}: no such file (weights are never downloaded here, --weights takes a saved state_dict); "
            f"{_download_hint(library, name)}, copy {name}.pth here and pass --weights {name}.pth"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's input problem: say which file
        raise PretextlabError(f"--weights {path} is not a readable state_dict ({type(error).__name__}: {error})") from error
    # Training scripts often wrap the weights ({"state_dict": ...}, {"model": ...}) or save a DDP module.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 3:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretextlabError(f"--weights {path} holds no state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(model: nn.Module, path: Path, library: str, name: str) -> None:
    state = _read_state_dict(path, library, name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = " ".join(s.strip() for s in str(error).splitlines()[1:3])
        first = first if len(first) <= 300 else first[:300] + "..."
        raise PretextlabError(
            f"--weights {path} does not fit {library}:{name}: {first} (save the state_dict of "
            f"the same architecture: {_download_hint(library, name)})"
        ) from error


def _unknown(library: str, name: str, names: list[str], how: str) -> PretextlabError:
    close = difflib.get_close_matches(name, names, n=5)
    near = f" (closest: {', '.join(close)})" if close else ""
    return PretextlabError(f"--backbone {library}:{name}: {library} has no model {name!r}{near}; list the names with {how}")


def _torchvision(spec: BackboneSpec, name: str) -> Backbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    if name not in torchvision.models.list_models():
        raise _unknown("torchvision", name, torchvision.models.list_models(),
                       "python -c \"import torchvision; print(torchvision.models.list_models())\"")
    # fork_rng: the init seed decides these weights without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = torchvision.models.get_model(name, weights=None)
    if spec.weights:
        _load_weights(model, Path(spec.weights), "torchvision", name)
    model.eval()
    nodes = get_graph_node_names(model)[1]
    # pre_logits is what the classifier reads: the node feeding the last Linear layer (resnet: flatten).
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1] not in nodes or nodes.index(linears[-1]) == 0:
        raise PretextlabError(f"torchvision:{name} has no final Linear classifier to take pre_logits from: name its nodes with --output")
    pre_logits = nodes[nodes.index(linears[-1]) - 1]
    # A module's name stands for its last node (create_feature_extractor's rule): "layer1" is a node too.
    named = set(nodes) | {n.rsplit(".", i)[0] for n in nodes for i in range(1, n.count(".") + 1)}
    stages = [s for s in ("layer1", "layer2", "layer3", "layer4") if s in named]  # the ResNet family's stages
    features = getattr(model, "features", None)
    if not stages and isinstance(features, nn.Sequential):
        pools = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]  # VGG: after each block
        stages = pools or ([f"features.{i}" for i in range(len(features))] if len(features) <= 12 else [])
    stages = [s for s in stages if s in named]

    def make(outputs: tuple[str, ...]) -> nn.Module:
        wanted = {pre_logits if o == PRE_LOGITS else o: o for o in outputs}
        extractor = create_feature_extractor(model, return_nodes=wanted)
        return _Outputs(extractor, extractor, outputs)

    image_size = spec.image_size or 224
    return Backbone(
        f"torchvision:{name}", model, (*stages, PRE_LOGITS), make, lambda o: o == PRE_LOGITS or o in named,
        "python -c \"import torchvision; from torchvision.models.feature_extraction import get_graph_node_names; "
        f"print(get_graph_node_names(torchvision.models.get_model('{name}'))[1])\"",
        image_size, TORCHVISION_CROP_PCT, TORCHVISION_MEAN, TORCHVISION_STD,
        _identity(spec, "torchvision", name, torchvision.__version__),
    )


def _timm(spec: BackboneSpec, name: str) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "python -c \"import timm; print(timm.list_models('*resnet*'))\"")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = timm.create_model(name, pretrained=False)  # pretrained=False: timm never downloads
    if spec.weights:
        _load_weights(model, Path(spec.weights), "timm", name)
    model.eval()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    modules = dict(model.named_modules())
    # The stages timm's features_only=True returns; taken by hooks on the one model, so a single
    # forward pass gives them and pre_logits, and the weights are loaded once.
    stages = tuple(info["module"] for info in getattr(model, "feature_info", []) if info.get("module") in modules)

    def make(outputs: tuple[str, ...]) -> nn.Module:
        def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
            taken: dict[str, torch.Tensor] = {}
            hooks = [modules[o].register_forward_hook(lambda _m, _i, out, o=o: taken.__setitem__(o, out))
                     for o in outputs if o != PRE_LOGITS]
            try:
                features = model.forward_features(x)
                if PRE_LOGITS in outputs:
                    taken[PRE_LOGITS] = model.forward_head(features, pre_logits=True)
            finally:
                for hook in hooks:
                    hook.remove()
            return {o: _token_map(taken[o], prefix) if o != PRE_LOGITS else taken[o] for o in outputs}

        return _Outputs(forward, model, outputs)

    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)

    input_size = cfg.get("input_size") or (3, 224, 224)
    return Backbone(
        f"timm:{name}", model, (*stages, PRE_LOGITS), make, lambda o: o == PRE_LOGITS or (o in modules and o != ""),
        f"python -c \"import timm; print([n for n, _ in timm.create_model('{name}').named_modules()])\"",
        spec.image_size or int(input_size[-1]), float(cfg.get("crop_pct") or TORCHVISION_CROP_PCT),
        tuple(float(v) for v in cfg.get("mean", TORCHVISION_MEAN)), tuple(float(v) for v in cfg.get("std", TORCHVISION_STD)),
        _identity(spec, "timm", name, timm.__version__),
    )


def _token_map(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """A transformer block's (B, N, C) tokens -> (B, C, H, W) without the class/register tokens, as timm's
    features_only returns ViT stages, so the study's pooling rule applies to them as to any feature map."""
    if x.dim() != 3:
        return x
    tokens = x[:, prefix:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise PretextlabError(f"an output of {tokens.shape[1]} tokens is not a square grid: name another output")
    return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _identity(spec: BackboneSpec, library: str, name: str, version: str) -> dict[str, Any]:
    """What the probed weights are: where a run's result records its checkpoint (step, SHA-256)."""
    # The library's version is part of it: another version may initialise (or build) the network differently.
    identity: dict[str, Any] = {"backbone": f"{library}:{name}", "library_version": version}
    if spec.weights:
        path = Path(spec.weights)
        identity.update(weights="file", sha256=file_sha256(path), weights_file=str(path.resolve()))
    else:
        identity.update(weights="random-init", sha256=None, init_seed=spec.init_seed)
    return identity


def build_backbone(spec: BackboneSpec) -> Backbone:
    """The named network, its weights loaded (or seeded random init); never downloads."""
    if spec.image_size is not None and spec.image_size < 16:
        raise PretextlabError(f"--image-size {spec.image_size} is too small: use 16 or more")
    library, name = spec.parsed()
    backbone = _torchvision(spec, name) if library == "torchvision" else _timm(spec, name)
    if spec.resize_size is not None and spec.resize_size < backbone.image_size:
        raise PretextlabError(
            f"--resize-size {spec.resize_size} is smaller than the {backbone.image_size}-px input (--image-size, default "
            f"the model's own) it is centre-cropped to: use {backbone.image_size} or more, or drop it for the library's rule"
        )
    return backbone


def backbone_views(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    """uint8 images (grey ones already 3 equal channels: data.ImageSet) -> the backbone's normalised input, 1 view."""

    def views(images: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = augment.to_unit(images)
        x = augment.resize(augment.center_crop(x, min(image_size, *x.shape[-2:])), image_size)
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s, 1

    return views


@dataclass
class _Source:
    """The fields of a run's config that ``downstream_splits`` reads, for a backbone (no run of its own)."""

    dataset: str
    data_dir: str | None
    decode_size: int
    val_size: float | None = None


def _checked_network(backbone: Backbone, outputs: tuple[str, ...]) -> nn.Module:
    """The network of ``outputs``, run once on one blank image so that a size it cannot take (a ViT's
    fixed 224) is one clear error before anything is written, not a traceback mid-extraction."""
    try:
        network = backbone.make_network(outputs)
        with torch.inference_mode():
            network(torch.zeros(1, 3, backbone.image_size, backbone.image_size))
    except Exception as error:  # tracing and forward errors of any model zoo network: name the settings
        raise PretextlabError(
            f"{backbone.name} does not run on {backbone.image_size}x{backbone.image_size} inputs at outputs "
            f"{', '.join(outputs)} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
            "choose another --image-size (the model's own is its default) or other --output nodes"
        ) from error
    return network


def evaluate_backbone(spec: BackboneSpec, config: EvalConfig, progress: bool = True, log: Log = _stderr) -> list[dict[str, Any]]:
    """Probe a torchvision/timm backbone at ``config.outputs``; store the results in ``spec.out_dir()/probes``."""
    backbone = build_backbone(spec)
    outputs = backbone.default_outputs if tuple(config.outputs) == ("all",) else tuple(config.outputs)
    unknown = [o for o in outputs if not backbone.known(o)]
    if unknown:
        raise PretextlabError(
            f"{backbone.name} has no output {', '.join(unknown)}: choose from {', '.join(backbone.default_outputs)} or all, "
            f"or any node listed by {backbone.list_hint}"
        )
    dataset = config.dataset or "fashion-mnist"
    if spec.resize_size is not None and dataset != "folder":
        raise PretextlabError(
            f"--resize-size sizes --dataset folder files before their centre crop; {dataset}'s whole image is "
            "resized to --image-size: drop --resize-size"
        )
    network = _checked_network(backbone, outputs)
    config = dataclasses.replace(config, dataset=dataset)
    if config.probe != "lbfgs" and config.sgd_preset is None:
        config = dataclasses.replace(config, sgd_preset=config.resolved_sgd_preset())
    # Folder images are decoded larger and centre-cropped, as each library's own eval transform does;
    # Fashion-MNIST's whole 28x28 image is resized to the input side.
    # floor, as timm's transforms_imagenet_eval sizes its resize (224 / 0.875 = 256 either way for torchvision;
    # timm's 0.95 at 224 gives 235, where round would give 236). --resize-size replaces that rule: the
    # weights' own transform (torchvision's IMAGENET1K_V2: 232 for 224) is not in a state_dict. Only the
    # decode size is keyed, so a flag equal to the rule reuses the rule's cache and results.
    rule = math.floor(backbone.image_size / backbone.crop_pct)
    decode_size = (spec.resize_size or rule) if dataset == "folder" else backbone.image_size
    resolve_device(config.device)  # a bad --device fails before anything is written
    splits = downstream_splits(_Source(dataset, config.data_dir, decode_size), config)
    # The same bytes at another path are the same weights: the file's path is recorded, not keyed.
    identity = {k: v for k, v in backbone.identity.items() if k != "weights_file"}
    identity["input"] = backbone.input_recipe(decode_size, dataset)
    key = content_key("backbone", identity, dataset, config.data_dir, config.val_size, config.limit, config.test_limit,
                      config.seed, splits.describe())
    out = spec.out_dir()
    views = backbone_views(backbone.image_size, backbone.mean, backbone.std)
    results = probe_representation(
        network, views, splits, outputs, out / FEATURES_DIR, key, config, progress=progress,
        probe_checkpoint_dir=out / PROBES_DIR / "checkpoints", log=log,
        train_views=lambda images, generator: views(random_crops(images, min(backbone.image_size, *images.shape[-2:]), generator)),
    )
    fields = dict(run=None, backbone=backbone.name, weights_file=backbone.identity.get("weights_file"), task=None,
                  network=backbone.name, width=None, dataset=dataset)
    return store_results(results, out / PROBES_DIR, dataset_tag(dataset, config.data_dir), config, identity, splits, fields, log)
