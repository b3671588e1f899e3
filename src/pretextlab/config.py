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
from pretextlab.options import check_choices, check_fields, check_instance, flag_name, option, section_dataclass

# The study's schedule (docs/protocol.md#training-schedule): 35 epochs, warm-up over 5, x0.1 at 15 and 25.
PAPER_EPOCHS = 35.0
PAPER_WARMUP_EPOCHS = 5.0
PAPER_DECAY_EPOCHS = (15.0, 25.0)

# Fields that do not change what a run computes: left out of the hash and of resume's comparison.
# ``data_dir`` is not one of them: two image folders are two datasets (resolve makes it a real path).
# The kNN monitor and the live logs only watch the run (issue 17): they change no weight.
_RUNTIME_FIELDS = frozenset({"device", "workers", "checkpoint_every", "compile",
                             "monitor_every", "monitor_outputs", "monitor_labels", "monitor_images", "wandb"})

# Keys that config.json files written by earlier versions hold but that are no longer options:
# ``extra`` was never read. They are dropped on load.
_RETIRED_KEYS = frozenset({"extra"})

# Options added after runs were recorded, with the value that reproduces what a config.json
# without the key was trained with (issue 16: the released crops, BatchNorm and init became the
# folder default). A saved config missing the key loads with this value (``from_saved``), resume
# compares a missing key as this value, and the hash leaves the key out at this value, so old runs
# keep their meaning and their hash.
LEGACY_VALUES: dict[str, Any] = {
    "crop_source": "center-square", "bn_init": "pytorch",
    "crop_resize": "pillow-box",  # crops cut while decoding, resized by Pillow with its filter reaching past the box
    "permutations": None,  # Jigsaw's generated set (--permutations FILE reads the published one)
    "exemplar_group_images": 0,  # Exemplar's triplet loss over the whole per-device batch
    "exemplar_eval_input": "standardized",  # Exemplar's frozen features read standardised images
    "rotation_augmentation": "jitter",  # Rotation's torchvision-style colour jitter
    "weight_decay_scope": "conv-kernels",  # L2 on the network's conv kernels only: no head decayed, RevNet stem decayed
}


def _unread_new_options(task: Any) -> frozenset[str]:
    """The ``LEGACY_VALUES`` options that ``task`` never reads (another task's own option): left out
    of its hash and of resume's comparison, so a new default of Exemplar's options does not re-key
    or block the runs of Rotation (each config records every built-in task's options)."""
    from pretextlab.tasks import BUILT_IN_TASKS, task_info

    try:
        read = {f.name for f in dataclasses.fields(task_info(task).options)}
    except (PretextlabError, TypeError):
        return frozenset()
    # Only task options can go unread: a run-wide option (weight_decay_scope) is read by every task.
    owned = {f.name for name in BUILT_IN_TASKS for f in dataclasses.fields(task_info(name).options)}
    return frozenset(k for k in LEGACY_VALUES if k in owned and k not in read)


def _built_in_task_options() -> type:
    """A dataclass holding, as flat fields, the own options of every task that ships with pretextlab.

    Each field is the one its task's options dataclass defines (type, default, help, choices), so
    ``--copies`` or ``--patch-size`` exist once; an option shared by several tasks (``embedding_dim``)
    is one inherited field, of section "task". Flat, because the run's hash has always been taken
    over these keys (config.json's "config" before run format 2): old runs keep their meaning and
    their hash. A plug-in task's options take their defaults (they are no flags).
    """
    from pretextlab.options import field_types
    from pretextlab.tasks import BUILT_IN_TASKS, task_info
    from pretextlab.tasks.base import own_fields

    chosen: dict[str, dataclasses.Field] = {}
    specs = []
    for name in BUILT_IN_TASKS:
        options = task_info(name).options
        hints = field_types(options)
        for f in own_fields(options):
            if f.name in chosen:
                if chosen[f.name] is not f:  # two definitions of one flag: make it one (a shared base class)
                    raise TypeError(f"task option {f.name!r} is defined twice; define it once in a shared options class")
                continue
            chosen[f.name] = f
            # Section "task": a task's options are the task's, whatever their dataclass says.
            metadata = {**f.metadata, "section": "task"}
            specs.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=metadata)))
    return dataclasses.make_dataclass("BuiltInTaskOptions", specs)


@dataclass
class TrainConfig(_built_in_task_options()):
    """Everything that defines a pretext training run (the tasks' own options come from its base)."""

    task: str = option("rotation", "pretext task: rotation, exemplar, jigsaw, relative_patch, or module:Class for one "
                       "registered outside pretextlab (the module is imported; its folder must be on PYTHONPATH)", section="task")
    network: str = option("resnet50v1", "resnet50v1, resnet50v2, revnet50 or vgg19bn", section="network")
    width: int | None = option(None, "widening factor k (default: the network's, 4; 8 for vgg19bn)", metavar="K", section="network")
    final_relu: bool = option(True, 'the ReLU before pooling; --no-final-relu is the "(-)" variant (v2, RevNet)', section="network")
    representation_size: int | None = option(None, "a linear layer makes pre_logits this size", metavar="D", section="network")

    dataset: str = option("fashion-mnist", "fashion-mnist or folder (ROOT/train/<class>/*, ROOT/val/<class>/*)", section="data")
    data_dir: str | None = option(None, "where the dataset lives (part of the recipe: another folder is another dataset)", metavar="DIR", section="data")
    image_size: int | None = option(None, "network input side (default: 224 for folder, 32 for fashion-mnist)", metavar="PX", section="data")
    decode_size: int | None = option(None, "side the loader decodes to (default: 8/7 of --image-size for folder)", metavar="PX", section="data")
    crop_source: str | None = option(
        None, "training crops: full-image (the released recipe: a random box of the whole image, cut while decoding) or "
        "center-square (crops of the decoded centre square); default: full-image for folder, center-square for fashion-mnist",
        choices=("full-image", "center-square"), section="data",
    )
    crop_resize: str | None = option(
        None, "how a crop cut while decoding becomes the network input: crop-then-resize (the box's own pixels, as the "
        "released code; default with --crop-source full-image) or pillow-box (Pillow's resize(box=...), whose filter "
        "reads past the box: runs recorded before this option)",
        choices=("crop-then-resize", "pillow-box"), section="data",
    )
    limit: int | None = option(None, "use a class-balanced subset of N training images", metavar="N", section="data")
    test_limit: int | None = option(None, "use a class-balanced subset of N test images", metavar="N", section="data")
    val_size: float | None = option(None, "held-out validation images: a count (>= 1) or a fraction (< 1)", metavar="N", section="data")

    epochs: float = option(PAPER_EPOCHS, "epochs (the schedule keeps the study's proportions)", section="optimisation")
    batch_size: int | None = option(None, "images per step, before a task multiplies them (default: the study's per task)", metavar="N", section="optimisation")
    base_lr: float = option(0.1, "learning rate at a global batch of 256 images (scaled linearly)", metavar="LR", section="optimisation")
    warmup_epochs: float | None = option(None, "linear warm-up epochs (default: the study's 5/35 of the run)", metavar="E", section="optimisation")
    decay_epochs: tuple[float, ...] | None = option(None, "epochs of the step decays (default: the study's 15/35 and 25/35 of the run)", metavar="E", section="optimisation")
    decay_factor: float = option(0.1, "learning-rate factor at each decay", section="optimisation")
    momentum: float = option(0.9, "SGD momentum", section="optimisation")
    weight_decay: float = option(1e-4, "L2 factor on the kernels --weight-decay-scope names (the study: 1e-4)", section="optimisation")
    weight_decay_scope: str | None = option(
        None, "which tensors weight decay reaches: released (every conv/linear kernel, the task's logits or embedding "
        "included, at --weight-decay; the patch tasks' two-layer head at 5e-4; not the RevNet stem) or conv-kernels "
        "(the network's conv kernels only); default: released for folder, conv-kernels for fashion-mnist",
        choices=("released", "conv-kernels"), section="optimisation",
    )

    crop_scale: tuple[float, float] = option((0.08, 1.0), "inception crop: the fraction of the image's area, min and max", metavar=("MIN", "MAX"), section="data")
    flip: bool = option(True, "random horizontal flips in training (--no-flip for digits, text)", section="data")
    # The tasks' own options (--copies, --margin, --patch-size, ...) are fields of the base class,
    # made from each task's options dataclass (their one definition; see tasks/).
    reversible_backward: bool | None = option(None, "revnet50: recompute activations in the backward pass (saves memory; default: on)", section="network")

    seed: int = option(0, "random seed (data splits, initialisation, augmentation)", section="runtime")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", section="runtime")
    workers: int | None = option(None, "data loader processes, decoding only (default: 0 in memory, up to 8 for folders)", metavar="N", section="runtime")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 elsewhere), fp32, bf16, or fp64 (exactness checks)",
                            choices=("auto", "fp32", "bf16", "fp64"), section="runtime")
    channels_last: bool | None = option(None, "channels-last memory format (default: on for CUDA)", section="runtime")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (multi-process; the study: per device)", section="optimisation")
    bn_init: str | None = option(
        None, "BatchNorm and init: released (TF defaults: BN momentum 0.01, eps 1e-3, glorot-uniform convs; patch head BN "
        "momentum 0.003) or pytorch (BN momentum 0.1, eps 1e-5, kaiming-normal convs); default: released for folder, "
        "pytorch for fashion-mnist", choices=("released", "pytorch"), section="network",
    )
    compile: bool = option(False, "torch.compile the network (GPU speed; same results)", section="runtime")
    val_batches: int | None = option(None, "cap on the validation batches scored per epoch", metavar="N", section="runtime")
    checkpoint_every: int | None = option(None, "also checkpoint every N steps inside an epoch", metavar="N", section="runtime")
    log_every: int = option(10, "log metrics every N steps", metavar="N", section="runtime")
    monitor_every: int | None = option(
        None, "kNN monitor (weighted kNN top-1 on frozen features, k=20 and 200) every N steps; default: at each "
        "epoch's end; 0: off", metavar="STEPS", section="runtime",
    )
    monitor_outputs: tuple[str, ...] = option(("pre_logits",), "the named outputs the kNN monitor reads", metavar="OUTPUT", section="runtime")
    monitor_labels: int = option(1000, "the kNN monitor's labelled bank: a class-balanced subset of the training split "
                                 "(at most a tenth of it)", metavar="N", section="runtime")
    monitor_images: int = option(1000, "held-out (validation split) images the kNN monitor scores", metavar="N", section="runtime")
    wandb: str | None = option(None, "also log to this Weights & Biases project (pip install pretextlab[wandb])", metavar="PROJECT", section="runtime")

    def to_dict(self) -> dict[str, Any]:
        """Every option by name: the flat form a study's ``pretext:`` block, the store and the hash use."""
        return dataclasses.asdict(self)

    def sections(self) -> "RecipeSections":
        """The recipe as typed, read-only sections; the task's gets its own options dataclass,
        exactly as ``task_options`` gives it to the task (other tasks' options are not in the view)."""
        views = {name: view(**{f.name: getattr(self, f.name) for f in dataclasses.fields(view)})
                 for name, view in _SECTION_VIEWS.items()}
        return RecipeSections(**views, task=TaskSection(self.task, task_options(self)))

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "TrainConfig":
        """A config from a flat mapping (a saved config.json's options, a study's ``pretext:`` block),
        every value type-checked against the field it sets; ``where`` names the source in errors."""
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

    @classmethod
    def from_saved(cls, data: Any, where: str = "") -> "TrainConfig":
        """A config from a run's config.json options, flat (``run_dir.saved_options``): keys it lacks
        because they did not exist when it was written take the value that run was trained with
        (``LEGACY_VALUES``)."""
        if isinstance(data, dict):
            data = {**data, **{k: v for k, v in LEGACY_VALUES.items() if data.get(k) is None}}
        return cls.from_dict(data, where)

    def config_hash(self) -> str:
        """A short hash of what the run computes (runtime-only fields excluded; an option at its
        legacy value is left out, so runs recorded before it existed keep their hash, and so is a new
        option the run's task never reads, see ``_unread_new_options``)."""
        unread = _unread_new_options(self.task)
        # In canonical form, so TrainConfig(epochs=35) from Python, epochs: 35 from YAML and
        # --epochs 35 from the CLI are one run.
        payload = {
            k: v for k, v in check_instance(self).to_dict().items()
            if k not in _RUNTIME_FIELDS and k not in unread and not (k in LEGACY_VALUES and v in (None, LEGACY_VALUES[k]))
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# The typed sections of a recipe (TrainConfig.sections(); config.json's objects, training/run_dir.py).
DataSection = section_dataclass(TrainConfig, "data")
NetworkSection = section_dataclass(TrainConfig, "network")
OptimisationSection = section_dataclass(TrainConfig, "optimisation")
RuntimeSection = section_dataclass(TrainConfig, "runtime")


@dataclass(frozen=True)
class TaskSection:
    """The task (a name, or a plug-in's ``module:Class``) and its own options dataclass instance."""

    name: str
    options: Any


_SECTION_VIEWS = {"data": DataSection, "network": NetworkSection, "optimisation": OptimisationSection,
                  "runtime": RuntimeSection}


@dataclass(frozen=True)
class RecipeSections:
    """A TrainConfig by section (``TrainConfig.sections()``)."""

    data: Any
    network: Any
    task: TaskSection
    optimisation: Any
    runtime: Any


def task_options(config: TrainConfig) -> Any:
    """The options dataclass of the config's task, filled from the config's fields of the same names."""
    from pretextlab.tasks import task_options as options_for

    return options_for(config.task, config)


def resolve(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill every derived default; returns a new, complete config."""
    # Imported here: the data and models packages are not needed to define a config.
    from pretextlab.data import DATASETS
    from pretextlab.models import NETWORKS, network_info
    from pretextlab.tasks import BUILT_IN_TASKS, task_info, task_options

    # Types first (a Python caller's epochs="one" is as wrong as YAML's); lists become tuples, so
    # lists and tuples (from JSON, YAML or Python callers) give one form and one hash.
    c = check_instance(config)
    if c.data_dir is not None:
        # Two spellings of one folder are one dataset; two folders are two (the hash includes it).
        c.data_dir = os.path.realpath(os.path.expanduser(c.data_dir))
    if c.permutations is not None:
        # Like data_dir: the file is part of the recipe, and resume or evaluate may run elsewhere.
        c.permutations = os.path.realpath(os.path.expanduser(c.permutations))
    info = task_info(c.task)  # a clear error listing the tasks if unknown; imports a module:Class task
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
    if c.crop_source is None:
        # The released recipe cuts training crops from the whole file (data/crops.py); in-memory
        # sets (Fashion-MNIST) keep their whole small image as the "centre square".
        c.crop_source = "full-image" if c.dataset == "folder" else "center-square"
    if c.crop_source == "full-image" and c.dataset != "folder":
        raise PretextlabError(
            f"--crop-source full-image cuts crops while decoding image files (--dataset folder); {c.dataset} is held in "
            "memory: use --crop-source center-square"
        )
    if c.crop_resize is None:
        # Read only by crops cut while decoding (data/decode.py); other runs get the legacy value,
        # which the hash leaves out, so their hash is unchanged.
        c.crop_resize = "crop-then-resize" if c.crop_source == "full-image" else LEGACY_VALUES["crop_resize"]
    if c.bn_init is None:
        # TF's defaults for folder datasets (the paper's scale); PyTorch's keep the Fashion-MNIST demo's numbers.
        c.bn_init = "released" if c.dataset == "folder" else "pytorch"
    if c.rotation_augmentation is None:
        # slim's fast-mode colours for folder datasets (issue 16 item 2); the jitter keeps the demo's numbers.
        c.rotation_augmentation = "released" if c.dataset == "folder" else "jitter"
    if c.weight_decay_scope is None:
        # The released decay scope for folder datasets (issue 16 item 3); conv kernels keep the demo's numbers.
        c.weight_decay_scope = "released" if c.dataset == "folder" else "conv-kernels"
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
        c.batch_size = info.default_batch_size
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
    check_choices(c)
    # Each task's checks live with its options. Every built-in task's options are checked, as they
    # are all recorded in the config (a wrong --margin is refused whatever the task), and the task's own.
    for name in dict.fromkeys((*BUILT_IN_TASKS, c.task)):
        task_options(name, c)
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
    ("seed", 0, True, "the random seed"),
    ("val_batches", 1, True, "batches"),
    ("checkpoint_every", 1, True, "steps"),
    ("log_every", 1, True, "steps"),
    ("monitor_every", 0, True, "steps; 0 turns the kNN monitor off"), ("monitor_labels", 1, True, "images"), ("monitor_images", 1, True, "images"),
)
_UPPER_BOUNDS = (("momentum", 1, False),)


def _check_ranges(c: TrainConfig) -> None:
    """Values of the right type but outside what the option can mean (NaN included)."""
    for name in ("epochs", "base_lr", "warmup_epochs", "decay_factor", "momentum", "weight_decay",
                 "val_size", "crop_scale", "decay_epochs"):
        value = getattr(c, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not math.isfinite(v) for v in values):
            raise PretextlabError(f"{flag_name(name)} must be a finite number, got {value!r}")
    for name, low, inclusive, meaning in _LOWER_BOUNDS:
        value = getattr(c, name)
        if value is not None and (value < low or (value == low and not inclusive)):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise PretextlabError(f"{flag_name(name)} must be {bound} ({meaning}), got {value!r}")
    for name, high, inclusive in _UPPER_BOUNDS:
        value = getattr(c, name)
        if value > high or (value == high and not inclusive):
            bound = f"<= {high}" if inclusive else f"< {high}"
            raise PretextlabError(f"{flag_name(name)} must be {bound}, got {value!r}")


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two saved configs, ignoring runtime-only fields."""
    unread = _unread_new_options(old.get("task")) & _unread_new_options(new.get("task"))
    keys = sorted((set(old) | set(new)) - _RUNTIME_FIELDS - _RETIRED_KEYS - unread)
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples vs lists
    # A key a config.json lacks (written before the option existed) means its legacy value.
    value = lambda c, k: LEGACY_VALUES[k] if k in LEGACY_VALUES and c.get(k) is None else c.get(k)  # noqa: E731
    return [f"{k}: {value(old, k)!r} -> {value(new, k)!r}" for k in keys if norm(value(old, k)) != norm(value(new, k))]
