"""Typed configuration of a pretext training run, the study's schedule, and validation.

A config is a plain dataclass: it is saved as JSON in the run directory, hashed to key the run,
and compared on resume. ``resolve`` fills every default that depends on other fields (image size
by dataset, a shortened schedule's warm-up and decays kept in the study's proportions), so the
saved config is the complete recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from pretextlab.errors import PretextlabError
from pretextlab.options import check_choices, check_fields, check_instance, option

# The study's schedule (PROTOCOL.md "Training"): 35 epochs, warm-up over 5, x0.1 at 15 and 25.
PAPER_EPOCHS = 35.0
PAPER_WARMUP_EPOCHS = 5.0
PAPER_DECAY_EPOCHS = (15.0, 25.0)

# The study's batch sizes in images (PROTOCOL.md "Pretext tasks").
PAPER_BATCH_SIZES = {"rotation": 64, "exemplar": 64, "jigsaw": 128, "relative_patch": 128}

# Fields that do not change what a run computes: left out of the hash and of resume's comparison.
# ``data_dir`` is not one of them: two image folders are two datasets (resolve makes it a real path).
_RUNTIME_FIELDS = frozenset({"device", "workers", "checkpoint_every", "compile"})

# Keys that config.json files written by earlier versions hold but that are no longer options:
# ``extra`` was never read. They are dropped on load.
_RETIRED_KEYS = frozenset({"extra"})


@dataclass
class TrainConfig:
    """Everything that defines a pretext training run."""

    task: str = option("rotation", "pretext task: rotation, exemplar, jigsaw, relative_patch (or module:Class, see tasks)")
    network: str = option("resnet50v1", "resnet50v1, resnet50v2, revnet50 or vgg19bn")
    width: int | None = option(None, "widening factor k (default: the network's, 4; 8 for vgg19bn)", metavar="K")
    final_relu: bool = option(True, 'the ReLU before pooling; --no-final-relu is the "(-)" variant (v2, RevNet)')
    representation_size: int | None = option(None, "a linear layer makes pre_logits this size", metavar="D")

    dataset: str = option("fashion-mnist", "fashion-mnist or folder (ROOT/train/<class>/*, ROOT/val/<class>/*)")
    data_dir: str | None = option(None, "where the dataset lives (part of the recipe: another folder is another dataset)", metavar="DIR")
    image_size: int | None = option(None, "network input side (default: 224 for folder, 32 for fashion-mnist)", metavar="PX")
    decode_size: int | None = option(None, "side the loader decodes to (default: 8/7 of --image-size for folder)", metavar="PX")
    limit: int | None = option(None, "use a class-balanced subset of N training images", metavar="N")
    test_limit: int | None = option(None, "use a class-balanced subset of N test images", metavar="N")
    val_size: float | None = option(None, "held-out validation images: a count (>= 1) or a fraction (< 1)", metavar="N")

    epochs: float = option(PAPER_EPOCHS, "epochs (the schedule keeps the study's proportions)")
    batch_size: int | None = option(None, "images per step, before a task multiplies them (default: the study's per task)", metavar="N")
    base_lr: float = option(0.1, "learning rate at a global batch of 256 images (scaled linearly)", metavar="LR")
    warmup_epochs: float | None = option(None, "linear warm-up epochs (default: the study's 5/35 of the run)", metavar="E")
    decay_epochs: tuple[float, ...] | None = option(None, "epochs of the step decays (default: the study's 15/35 and 25/35 of the run)", metavar="E")
    decay_factor: float = option(0.1, "learning-rate factor at each decay")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "L2 on convolution kernels only, as the study")

    crop_scale: tuple[float, float] = option((0.08, 1.0), "inception crop: the fraction of the image's area, min and max", metavar=("MIN", "MAX"))
    color_jitter: float = option(0.4, "colour-jitter strength (rotation)")
    flip: bool = option(True, "random horizontal flips in training (--no-flip for digits, text)")
    gray_probability: float = option(0.66, "probability of a gray image (exemplar, patch tasks)", metavar="P")
    patch_size: int = option(64, "patch side for jigsaw/relative_patch (64 = the study)", metavar="PX")
    copies: int = option(8, "exemplar copies per image")
    permutations_per_batch: int = option(8, "jigsaw permutations drawn per batch, every image shown under each")
    num_permutations: int = option(100, "size of the jigsaw permutation set")
    embedding_dim: int = option(1000, "per-patch vector (jigsaw, relative_patch) and exemplar embedding size")
    head_hidden: int = option(4096, "the patch tasks' FC layer width")
    margin: float = option(0.5, "exemplar triplet-loss margin")
    # Where the released code and the paper's text differ (tasks.base.TaskOptions explains each).
    permutation_criterion: str = option(
        "mean", "jigsaw set: mean (Noroozi & Favaro, the released set) or min (max-min) Hamming distance", choices=("mean", "min")
    )
    patch_eval_geometry: str = option(
        "released", "how a patch-trained network is fed to probes: the released evaluation or the pretext geometry",
        choices=("released", "pretext"),
    )
    exemplar_normalization: str = option(
        "batch", "exemplar: l2-normalise each dimension over the batch (the released code), each embedding, or none",
        choices=("batch", "embedding", "none"),
    )
    exemplar_color_distortion: bool = option(True, "exemplar: the released random brightness and saturation per copy")
    reversible_backward: bool | None = option(None, "revnet50: recompute activations in the backward pass (saves memory; default: on)")

    seed: int = option(0, "random seed (data splits, initialisation, augmentation)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    workers: int | None = option(None, "data loader processes, decoding only (default: 0 in memory, up to 8 for folders)", metavar="N")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 elsewhere), fp32, bf16, or fp64 (exactness checks)",
                            choices=("auto", "fp32", "bf16", "fp64"))
    channels_last: bool | None = option(None, "channels-last memory format (default: on for CUDA)")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (multi-process; the study: per device)")
    compile: bool = option(False, "torch.compile the network (GPU speed; same results)")
    val_batches: int | None = option(None, "cap on the validation batches scored per epoch", metavar="N")
    checkpoint_every: int | None = option(None, "also checkpoint every N steps inside an epoch", metavar="N")
    log_every: int = option(10, "log metrics every N steps", metavar="N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "TrainConfig":
        """A config from a mapping (a saved config.json's ``config``, a study section), every value
        type-checked against the field it sets; ``where`` names the source in errors."""
        place = f" in {where}" if where else ""
        if not isinstance(data, dict):
            raise PretextlabError(f"the training options{place} must be a mapping of option: value, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in _RETIRED_KEYS}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise PretextlabError(
                f"unknown training option(s) {', '.join(unknown)}{place}; valid options are: {', '.join(sorted(known))}"
            )
        return cls(**check_fields(cls, data, where))

    def config_hash(self) -> str:
        """A short hash of what the run computes (runtime-only fields excluded)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill every derived default; returns a new, complete config."""
    # Imported here so config stays importable without torch-heavy modules at module load.
    from pretextlab.data import DATASETS
    from pretextlab.models import NETWORKS, network_info
    from pretextlab.tasks import TASKS

    # Types first (a Python caller's epochs="one" is as wrong as YAML's); lists become tuples, so
    # lists and tuples (from JSON, YAML or Python callers) give one form and one hash.
    c = check_instance(config)
    if c.data_dir is not None:
        # Two spellings of one folder are one dataset; two folders are two (the hash includes it).
        c.data_dir = os.path.realpath(os.path.expanduser(c.data_dir))
    if c.task not in TASKS:
        raise PretextlabError(f"unknown task {c.task!r}: choose one of {', '.join(TASKS)}")
    if c.network not in NETWORKS:
        raise PretextlabError(f"unknown network {c.network!r}: choose one of {', '.join(NETWORKS)}")
    if c.dataset not in DATASETS:
        raise PretextlabError(f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    if c.width is not None and (not isinstance(c.width, int) or c.width < 1):
        raise PretextlabError(f"width must be an integer >= 1, got {c.width!r}")
    if c.image_size is None:
        c.image_size = 224 if c.dataset == "folder" else 32
    if c.decode_size is None:
        c.decode_size = round(c.image_size * 8 / 7) if c.dataset == "folder" else c.image_size
    if c.image_size < 16 or c.decode_size < c.image_size // 2:
        raise PretextlabError(
            f"image size {c.image_size} (decoded at {c.decode_size}) is too small: use --image-size >= 16"
        )
    if c.workers is None:
        # In-memory sets are indexed in-process; files need decoding processes to keep the device fed.
        c.workers = min(8, os.cpu_count() or 1) if c.dataset == "folder" else 0
    if c.workers < 0:
        raise PretextlabError(f"--workers must be >= 0, got {c.workers}")
    if c.batch_size is None:
        c.batch_size = PAPER_BATCH_SIZES[c.task]
    if c.batch_size < 2:
        raise PretextlabError(f"batch size must be >= 2 (BatchNorm needs a batch), got {c.batch_size}")
    if not c.epochs > 0:
        raise PretextlabError(f"epochs must be > 0, got {c.epochs}")
    scale = c.epochs / PAPER_EPOCHS
    if c.warmup_epochs is None:
        c.warmup_epochs = PAPER_WARMUP_EPOCHS * scale
    if c.decay_epochs is None:
        c.decay_epochs = tuple(e * scale for e in PAPER_DECAY_EPOCHS)
    if c.warmup_epochs < 0 or c.warmup_epochs > c.epochs:
        raise PretextlabError(f"warm-up of {c.warmup_epochs} epochs does not fit a run of {c.epochs} epochs")
    if any(not 0 <= e <= c.epochs for e in c.decay_epochs) or list(c.decay_epochs) != sorted(c.decay_epochs):
        raise PretextlabError(
            f"decay epochs {list(c.decay_epochs)} must be increasing and within the run's {c.epochs} epochs"
        )
    if not c.base_lr > 0:
        raise PretextlabError(f"base learning rate must be > 0, got {c.base_lr}")
    if not (0 < c.crop_scale[0] <= c.crop_scale[1] <= 1):
        raise PretextlabError(f"crop scale {c.crop_scale} must satisfy 0 < min <= max <= 1")
    if c.representation_size is not None and c.representation_size < 1:
        raise PretextlabError(f"representation size must be >= 1, got {c.representation_size}")
    if c.limit is not None and c.limit < 2:
        raise PretextlabError(f"--limit must be >= 2 images, got {c.limit}")
    if c.copies < 2:
        raise PretextlabError(f"exemplar needs >= 2 copies per image (the triplet loss needs a positive), got {c.copies}")
    if not 1 <= c.permutations_per_batch <= c.num_permutations:
        raise PretextlabError(
            f"--permutations-per-batch {c.permutations_per_batch} must be between 1 and --num-permutations {c.num_permutations}"
        )
    check_choices(c)
    _check_ranges(c)
    if c.reversible_backward and not network_info(c.network).supports_reversible_backward:
        raise PretextlabError(f"--reversible-backward is for networks of reversible units (revnet50), not {c.network}: drop the flag")
    return c


# (field, lowest allowed, whether the lowest is allowed, what the value means); None values are defaults.
_LOWER_BOUNDS = (
    ("decode_size", 1, True, "pixels"),
    ("test_limit", 1, True, "images"),
    ("val_size", 0, False, "images (a count >= 1 or a fraction < 1)"),
    ("decay_factor", 0, False, "the factor of each decay"),
    ("momentum", 0, True, "SGD momentum"),
    ("weight_decay", 0, True, "the L2 factor"),
    ("color_jitter", 0, True, "the jitter strength"),
    ("gray_probability", 0, True, "a probability"),
    ("patch_size", 8, True, "pixels"),
    ("embedding_dim", 1, True, "dimensions"),
    ("head_hidden", 1, True, "units"),
    ("margin", 0, True, "the triplet-loss margin"),
    ("seed", 0, True, "the random seed"),
    ("val_batches", 1, True, "batches"),
    ("checkpoint_every", 1, True, "steps"),
    ("log_every", 1, True, "steps"),
)
_UPPER_BOUNDS = (("momentum", 1, False), ("gray_probability", 1, True))


def _check_ranges(c: TrainConfig) -> None:
    """Values of the right type but outside what the option can mean (NaN included)."""
    for name in ("epochs", "base_lr", "warmup_epochs", "decay_factor", "momentum", "weight_decay",
                 "color_jitter", "gray_probability", "margin", "val_size", "crop_scale", "decay_epochs"):
        value = getattr(c, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not math.isfinite(v) for v in values):
            raise PretextlabError(f"--{_flag(name)} must be a finite number, got {value!r}")
    for name, low, inclusive, meaning in _LOWER_BOUNDS:
        value = getattr(c, name)
        if value is not None and (value < low or (value == low and not inclusive)):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise PretextlabError(f"--{_flag(name)} must be {bound} ({meaning}), got {value!r}")
    for name, high, inclusive in _UPPER_BOUNDS:
        value = getattr(c, name)
        if value > high or (value == high and not inclusive):
            bound = f"<= {high}" if inclusive else f"< {high}"
            raise PretextlabError(f"--{_flag(name)} must be {bound}, got {value!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two saved configs, ignoring runtime-only fields."""
    keys = sorted((set(old) | set(new)) - _RUNTIME_FIELDS - _RETIRED_KEYS)
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples vs lists
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if norm(old.get(k)) != norm(new.get(k))]
