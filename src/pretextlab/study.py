"""A study: the grid of pretext runs written down once, run, stopped, resumed, spread over a cluster.

A study file (YAML) names the grid; every key is checked, and a misspelt key, task, network,
output or probe is refused with the valid choices::

    name: mini-fashion
    out: ../runs/studies/mini-fashion      # the study directory (relative to this file); optional
    pretext:                               # TrainConfig fields shared by every run
      dataset: fashion-mnist
      epochs: 2
    grids:                                 # each grid is a cross product; cells are deduplicated
      - tasks: [rotation, exemplar]
        networks: [resnet50v1, "resnet50v2(-)"]   # "(-)": no ReLU before pooling (final_relu=False)
        widths: [1, 2]
        representation_sizes: [null]       # null = the network's own pre-logits size
        pretext: {}                        # per-grid overrides of the shared pretext fields
    downstream:                            # the datasets probes are fitted on, by a name of your choice
      fashion-mnist: {dataset: fashion-mnist, limit: 3000, test_limit: 2000}
    evaluations:                           # which outputs x probes x label budgets, on which datasets
      - outputs: [block3, block4, pre_logits]   # or [all]
        probes: [lbfgs]
        labels: [all, 10]                  # all | N labels per class | a fraction in (0, 1)
        datasets: [fashion-mnist]          # default: every downstream dataset
        where: {widths: [2]}               # only the cells with these tasks/networks/widths/sizes
        l2_grid: [1.0, 0.01, 0.0001]       # the L-BFGS probe's regularisation grid (default: its own)
        sgd: {schedule: paper, epochs: 35} # sgd / mlp probes: paper | paper_long, shortened in proportion
    runtime: {device: auto, workers: null, feature_batch_size: 256, stale_seconds: 300}
    executor: {kind: inline}               # inline | local | slurm, with submitit parameters

One cell = one pretext run (keyed by its config hash, in STUDY_DIR/runs/<hash>/) plus its probes.
The results store (STUDY_DIR/results.sqlite, see store.py) records each cell's status and every
probe result as soon as its group finishes, so a study resumes where it stopped: a finished cell is
skipped, an interrupted pretext run resumes from its checkpoint, and finished probes are not redone.
Cells run one after another in this process (``inline``), or as parallel jobs through submitit's
local executor or its Slurm executor.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from tqdm.auto import tqdm

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.store import DEFAULT_STALE_SECONDS, STORE_FILE, ProbeKey, ResultsStore, locate_store, worker_id

STUDY_PROBES = ("lbfgs", "sgd", "mlp")
EXECUTORS = ("inline", "local", "slurm")
NO_FINAL_RELU_SUFFIX = "(-)"
RUNS_DIR = "runs"
SUBMITIT_DIR = "submitit"
HEARTBEAT_SECONDS = 20.0
# A local job runs until it finishes unless the study file sets a limit (submitit's default is 2 minutes).
LOCAL_TIMEOUT_MIN = 7 * 24 * 60

TOP_LEVEL_KEYS = ("name", "out", "pretext", "grids", "downstream", "evaluations", "runtime", "executor")
GRID_KEYS = ("tasks", "networks", "widths", "representation_sizes", "pretext")
DOWNSTREAM_KEYS = ("dataset", "data_dir", "val_size", "limit", "test_limit", "seed")
EVALUATION_KEYS = ("outputs", "probes", "labels", "datasets", "where", "l2_grid", "sgd")
SGD_KEYS = ("schedule", "epochs", "batch_size", "base_lr")
WHERE_KEYS = ("tasks", "networks", "widths", "representation_sizes")
RUNTIME_KEYS = ("device", "workers", "feature_batch_size", "stale_seconds")
EXECUTOR_KEYS = ("kind", "parameters")
# Set by the grid, never by the shared pretext section.
GRID_CONTROLLED = ("task", "network", "width", "final_relu", "representation_size")
# Runtime-only TrainConfig fields; they belong in the runtime section (they do not change results).
RUNTIME_CONTROLLED = ("device", "workers")


# -- the study file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownstreamDataset:
    """A dataset probes are fitted on, under the study's own name for it (e.g. imagenet, places205)."""

    name: str
    dataset: str
    data_dir: str | None = None
    val_size: float | None = None
    limit: int | None = None
    test_limit: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class LabelBudget:
    """All labels, N labels per class, or a fraction of the labels."""

    per_class: int | None = None
    fraction: float | None = None

    @property
    def tag(self) -> str:
        # The same tag as EvalConfig.label_tag(), so store rows and plan rows match.
        if self.per_class is not None:
            return f"{self.per_class}pc"
        if self.fraction is not None:
            return f"{self.fraction:g}frac"
        return "all"


@dataclass(frozen=True)
class SgdSettings:
    """The SGD-trained probes' (sgd, mlp) schedule: the study's 'paper' (70 epochs, batch 512) or
    'paper_long' (520 epochs, batch 2048), optionally shortened in proportion or re-batched."""

    schedule: str = "paper"
    epochs: int | None = None
    batch_size: int | None = None
    base_lr: float | None = None


@dataclass(frozen=True)
class ProbeJob:
    """One planned probe result of a cell."""

    dataset: str  # the study's name of the downstream dataset
    output: str
    probe: str
    labels: LabelBudget
    l2_grid: tuple[float, ...] | None = field(default=None, compare=False)
    sgd: "SgdSettings | None" = field(default=None, compare=False)

    @property
    def key(self) -> ProbeKey:
        return (self.dataset, self.output, self.probe, self.labels.tag)


@dataclass(frozen=True)
class Evaluation:
    outputs: tuple[str, ...]
    probes: tuple[str, ...]
    labels: tuple[LabelBudget, ...]
    datasets: tuple[str, ...]
    where: dict[str, tuple[Any, ...]]
    l2_grid: tuple[float, ...] | None = None  # the L-BFGS probe's regularisation grid (None: its default)
    sgd: SgdSettings | None = None  # the sgd / mlp probes' schedule (None: the study's 'paper' one)

    def applies_to(self, task: str, network: str, width: int, representation_size: int | None) -> bool:
        values = {"tasks": task, "networks": network, "widths": width, "representation_sizes": representation_size}
        return all(values[key] in allowed for key, allowed in self.where.items())


@dataclass(frozen=True)
class Grid:
    tasks: tuple[str, ...]
    networks: tuple[str, ...]
    widths: tuple[int, ...]
    representation_sizes: tuple[int | None, ...] = (None,)
    pretext: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    """How cells run here; none of it changes a result."""

    device: str = "auto"
    workers: int | None = None  # data loader processes; None: the trainer's default (0 in memory, up to 8 for folders)
    feature_batch_size: int = 256
    stale_seconds: float = DEFAULT_STALE_SECONDS


@dataclass(frozen=True)
class ExecutorSettings:
    kind: str = "inline"
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """One pretext run of the grid and the probe results planned for it."""

    task: str
    network: str  # the study's name, "(-)" included
    width: int
    representation_size: int | None
    config: TrainConfig  # resolved
    config_hash: str
    run_dir: Path
    plan: list[ProbeJob]

    @property
    def label(self) -> str:
        size = f" d={self.representation_size}" if self.representation_size else ""
        return f"{self.task} {self.network} k={self.width}{size}"


@dataclass
class Study:
    name: str
    path: Path | None
    directory: Path
    pretext: dict[str, Any]
    grids: tuple[Grid, ...]
    downstream: dict[str, DownstreamDataset]
    evaluations: tuple[Evaluation, ...]
    runtime: Runtime
    executor: ExecutorSettings
    text: str

    @property
    def store_path(self) -> Path:
        return self.directory / STORE_FILE

    def cells(self) -> list[Cell]:
        """The grid, expanded: one cell per distinct pretext config, each with its probe plan."""
        return expand_cells(self)


def network_name(network: str) -> tuple[str, bool]:
    """ "resnet50v2(-)" -> ("resnet50v2", final_relu=False); a plain name keeps its final ReLU."""
    if network.endswith(NO_FINAL_RELU_SUFFIX):
        return network[: -len(NO_FINAL_RELU_SUFFIX)], False
    return network, True


def valid_network_names() -> tuple[str, ...]:
    from pretextlab.models import NETWORKS, network_info

    names: list[str] = []
    for name in NETWORKS:
        names.append(name)
        if network_info(name).has_final_relu_variant:
            names.append(name + NO_FINAL_RELU_SUFFIX)
    return tuple(names)


def network_outputs(network: str, cache: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The named outputs of a network family, as its registration declares them (nothing is built)."""
    from pretextlab.models import network_info

    base, _ = network_name(network)
    if base not in cache:
        cache[base] = network_info(base).outputs
    return cache[base]


def _where(context: str) -> str:
    return f" in {context}" if context else ""


def _check_keys(section: Any, valid: Iterable[str], context: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise PretextlabError(f"{context} must be a mapping of keys ({', '.join(valid)}), got {type(section).__name__}")
    unknown = [str(k) for k in section if k not in valid]
    if unknown:
        raise PretextlabError(f"unknown key {', '.join(map(repr, unknown))}{_where(context)}: valid keys are {', '.join(valid)}")
    return section


def _type_name(value: Any) -> str:
    return "null" if value is None else {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true/false",
                                          "list": "a list", "dict": "a mapping"}.get(type(value).__name__, type(value).__name__)


def _wrong_type(context: str, value: Any, expected: str) -> PretextlabError:
    """One message for a YAML value of the wrong type: the key, the value (and what YAML made of it), the type wanted."""
    return PretextlabError(f"{context} must be {expected}, got {value!r} ({_type_name(value)})")


def _optional_number(value: Any, context: str, *, whole: bool, minimum: float, expected: str) -> Any:
    if value is None:
        return None
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        raise _wrong_type(context, value, expected)
    return value


def _optional_string(value: Any, context: str, expected: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _wrong_type(context, value, expected)
    return value


def _section_list(value: Any, context: str, example: str) -> list[Any]:
    """A list of mappings (grids, evaluations); a single mapping counts as a list of one."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list) or not value:
        raise _wrong_type(context, value, f"a non-empty list of mappings, e.g. {example}")
    return value


def _as_list(value: Any, context: str) -> list[Any]:
    if value is None:
        raise PretextlabError(f"{context} is missing: give a list")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _choices(values: Iterable[Any], valid: Iterable[Any], what: str, context: str) -> tuple[Any, ...]:
    valid = tuple(valid)
    values = tuple(values)
    for value in values:
        if value not in valid:
            raise PretextlabError(f"unknown {what} {value!r}{_where(context)}: choose one of {', '.join(map(str, valid))}")
    if not values:
        raise PretextlabError(f"{context} is empty: give at least one {what} ({', '.join(map(str, valid))})")
    return values


def _positive_ints(values: Iterable[Any], what: str, context: str, allow_none: bool = False) -> tuple[Any, ...]:
    result = []
    for value in values:
        if value is None and allow_none:
            result.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or null" if allow_none else ""
            raise PretextlabError(f"{what} {value!r}{_where(context)} must be a whole number >= 1{extra}")
        result.append(value)
    if not result:
        raise PretextlabError(f"{context} is empty: give at least one {what}")
    return tuple(result)


def _label_budget(value: Any, context: str) -> LabelBudget:
    if value == "all" or value is None:
        return LabelBudget()
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value >= 1:
        return LabelBudget(per_class=value)
    elif isinstance(value, float) and 0 < value < 1:
        return LabelBudget(fraction=value)
    raise PretextlabError(
        f"label budget {value!r}{_where(context)} is not valid: use all, a whole number of labels per class (e.g. 10), "
        "or a fraction of the labels in (0, 1) (e.g. 0.1)"
    )


def _l2_grid(value: Any, context: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = _as_list(value, context)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise PretextlabError(f"{context} must be a list of L2 strengths >= 0, e.g. [1.0, 0.01, 0.0001], got {value!r}")
    return tuple(float(v) for v in values)


def _sgd_settings(value: Any, context: str) -> SgdSettings | None:
    from pretextlab.evaluate.probe_run import SGD_SCHEDULES

    if value is None:
        return None
    section = _check_keys(value, SGD_KEYS, context)
    settings = SgdSettings(**section)
    _choices([settings.schedule], SGD_SCHEDULES, "SGD schedule", f"{context}.schedule")
    for name in ("epochs", "batch_size"):
        number = getattr(settings, name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
            raise PretextlabError(f"{context}.{name} must be a whole number >= 1, got {number!r}")
    if settings.base_lr is not None and (isinstance(settings.base_lr, bool) or not isinstance(settings.base_lr, (int, float)) or settings.base_lr <= 0):
        raise PretextlabError(f"{context}.base_lr must be a number > 0, got {settings.base_lr!r}")
    return settings


def _pretext_fields(section: Any, context: str) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in GRID_CONTROLLED + RUNTIME_CONTROLLED]
    section = section or {}
    if not isinstance(section, dict):
        raise PretextlabError(f"{context} must be a mapping of training options, got {type(section).__name__}")
    for key in section:
        if key in GRID_CONTROLLED:
            raise PretextlabError(f"{key!r}{_where(context)} is set by the grid (tasks, networks, widths, representation_sizes): remove it")
        if key in RUNTIME_CONTROLLED:
            raise PretextlabError(f"{key!r}{_where(context)} is a runtime setting: put it in the runtime section")
    # Each value against its TrainConfig field's type: YAML's "false" is a string, 16.5 no batch size.
    from pretextlab.options import check_fields

    return check_fields(TrainConfig, _check_keys(section, valid, context), context)


def _downstream_types(settings: dict[str, Any], context: str) -> None:
    """A downstream dataset's values, each of the type its DownstreamDataset field takes."""
    if not isinstance(settings.get("dataset"), str):
        raise _wrong_type(f"{context}.dataset", settings.get("dataset"), "a dataset name (a string), e.g. fashion-mnist or folder")
    _optional_string(settings.get("data_dir"), f"{context}.data_dir", "a directory path (a string) or null")
    _optional_number(settings.get("val_size"), f"{context}.val_size", whole=False, minimum=0,
                     expected="a number of images, or a fraction < 1, or null")
    for key in ("limit", "test_limit"):
        _optional_number(settings.get(key), f"{context}.{key}", whole=True, minimum=1, expected="a whole number >= 1 or null")
    if "seed" in settings:
        if settings["seed"] is None:
            raise _wrong_type(f"{context}.seed", None, "a whole number")
        _optional_number(settings["seed"], f"{context}.seed", whole=True, minimum=0, expected="a whole number >= 0")


def parse_study(data: Any, *, path: Path | None = None, out: str | Path | None = None, text: str = "") -> Study:
    """Validate a study (the parsed YAML) and return it; ``out`` overrides the study directory."""
    from pretextlab.data import DATASETS
    from pretextlab.tasks import TASKS

    data = _check_keys(data, TOP_LEVEL_KEYS, "the study file")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise PretextlabError("the study file needs a name (a string without '/'), e.g. name: mini-fashion")
    file_out = _optional_string(data.get("out"), "out", "a directory path (a string)")
    if out is not None:
        directory = Path(out)
    elif file_out is not None:
        directory = Path(file_out)
        if not directory.is_absolute() and path is not None:
            directory = path.parent / directory
    else:
        directory = Path("runs") / "studies" / name
    directory = directory.resolve()

    pretext = _pretext_fields(data.get("pretext"), "pretext")

    networks_valid = valid_network_names()
    grid_sections = data.get("grids")
    if not grid_sections:
        raise PretextlabError("the study file needs grids: a list of {tasks, networks, widths} (see configs/mini-fashion.yaml)")
    grid_sections = _section_list(grid_sections, "grids", "[{tasks: [rotation], networks: [resnet50v1], widths: [1]}]")
    grids = []
    for index, section in enumerate(grid_sections):
        context = f"grids[{index}]"
        section = _check_keys(section, GRID_KEYS, context)
        grids.append(
            Grid(
                tasks=_choices(_as_list(section.get("tasks"), f"{context}.tasks"), TASKS, "task", f"{context}.tasks"),
                networks=_choices(
                    _as_list(section.get("networks"), f"{context}.networks"), networks_valid, "network", f"{context}.networks"
                ),
                widths=_positive_ints(_as_list(section.get("widths"), f"{context}.widths"), "width", f"{context}.widths"),
                representation_sizes=_positive_ints(
                    _as_list(section.get("representation_sizes", [None]), f"{context}.representation_sizes"),
                    "representation size",
                    f"{context}.representation_sizes",
                    allow_none=True,
                ),
                pretext=_pretext_fields(section.get("pretext"), f"{context}.pretext"),
            )
        )

    downstream_section = data.get("downstream")
    if not downstream_section or not isinstance(downstream_section, dict):
        raise PretextlabError(
            "the study file needs downstream: a mapping of your name for a dataset to its settings, "
            "e.g. downstream: {fashion-mnist: {dataset: fashion-mnist}}"
        )
    downstream = {}
    for ds_name, settings in downstream_section.items():
        context = f"downstream.{ds_name}"
        settings = _check_keys(settings, DOWNSTREAM_KEYS, context)
        _downstream_types(settings, context)
        if settings.get("dataset") not in DATASETS:
            raise PretextlabError(f"unknown dataset {settings.get('dataset')!r} in {context}.dataset: choose one of {', '.join(DATASETS)}")
        downstream[str(ds_name)] = DownstreamDataset(name=str(ds_name), **settings)

    evaluation_sections = data.get("evaluations")
    if not evaluation_sections:
        raise PretextlabError("the study file needs evaluations: a list of {outputs, probes, labels}")
    evaluation_sections = _section_list(evaluation_sections, "evaluations", "[{outputs: [pre_logits], probes: [lbfgs]}]")
    evaluations = []
    outputs_cache: dict[str, tuple[str, ...]] = {}
    all_networks = {n for g in grids for n in g.networks}
    for index, section in enumerate(evaluation_sections):
        context = f"evaluations[{index}]"
        section = _check_keys(section, EVALUATION_KEYS, context)
        where = _check_keys(section.get("where"), WHERE_KEYS, f"{context}.where")
        where_values: dict[str, tuple[Any, ...]] = {}
        for key, values in where.items():
            values = _as_list(values, f"{context}.where.{key}")
            if key == "tasks":
                values = _choices(values, TASKS, "task", f"{context}.where.tasks")
            elif key == "networks":
                values = _choices(values, networks_valid, "network", f"{context}.where.networks")
            else:
                values = _positive_ints(values, key[:-1].replace("_", " "), f"{context}.where.{key}", allow_none=key == "representation_sizes")
            where_values[key] = tuple(values)
        networks_here = [n for n in all_networks if n in where_values.get("networks", all_networks)]
        valid_outputs = sorted({o for n in networks_here for o in network_outputs(n, outputs_cache)}) + ["all"]
        evaluations.append(
            Evaluation(
                outputs=_choices(_as_list(section.get("outputs", ["pre_logits"]), f"{context}.outputs"), valid_outputs, "output", f"{context}.outputs"),
                probes=_choices(_as_list(section.get("probes", ["lbfgs"]), f"{context}.probes"), STUDY_PROBES, "probe", f"{context}.probes"),
                labels=tuple(_label_budget(v, f"{context}.labels") for v in _as_list(section.get("labels", ["all"]), f"{context}.labels")),
                datasets=_choices(
                    _as_list(section.get("datasets", list(downstream)), f"{context}.datasets"), list(downstream), "downstream dataset", f"{context}.datasets"
                ),
                where=where_values,
                l2_grid=_l2_grid(section.get("l2_grid"), f"{context}.l2_grid"),
                sgd=_sgd_settings(section.get("sgd"), f"{context}.sgd"),
            )
        )

    runtime_section = _check_keys(data.get("runtime"), RUNTIME_KEYS, "runtime")
    runtime = Runtime(**runtime_section)
    if not isinstance(runtime.device, str):
        raise _wrong_type("runtime.device", runtime.device, "a device name (a string): auto, cpu, cuda or cuda:N")
    if isinstance(runtime.feature_batch_size, bool) or not isinstance(runtime.feature_batch_size, int) or runtime.feature_batch_size < 1:
        raise PretextlabError(f"runtime.feature_batch_size must be a whole number >= 1, got {runtime.feature_batch_size!r}")
    if runtime.workers is not None and (isinstance(runtime.workers, bool) or not isinstance(runtime.workers, int) or runtime.workers < 0):
        raise PretextlabError(f"runtime.workers must be a whole number >= 0 (data loader processes), got {runtime.workers!r}")
    if isinstance(runtime.stale_seconds, bool) or not isinstance(runtime.stale_seconds, (int, float)) or runtime.stale_seconds <= HEARTBEAT_SECONDS:
        raise PretextlabError(f"runtime.stale_seconds must be a number of seconds > {HEARTBEAT_SECONDS:g} (the heartbeat period)")

    executor_section = data.get("executor") or {}
    if isinstance(executor_section, str):
        executor_section = {"kind": executor_section}
    executor_section = _check_keys(executor_section, EXECUTOR_KEYS, "executor")
    parameters = executor_section.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _wrong_type("executor.parameters", parameters, "a mapping of submitit parameters, e.g. {timeout_min: 60, slurm_partition: gpu}")
    if not isinstance(executor_section.get("kind", "inline"), str):
        raise _wrong_type("executor.kind", executor_section["kind"], f"a string: one of {', '.join(EXECUTORS)}")
    executor = ExecutorSettings(kind=executor_section.get("kind", "inline"), parameters=dict(parameters))
    _choices([executor.kind], EXECUTORS, "executor", "executor.kind")

    study = Study(
        name=name,
        path=path.resolve() if path is not None else None,
        directory=directory,
        pretext=pretext,
        grids=tuple(grids),
        downstream=downstream,
        evaluations=tuple(evaluations),
        runtime=runtime,
        executor=executor,
        text=text,
    )
    study.cells()  # every cell's config is validated (resolve) now, not hours into the study
    return study


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read and validate a study file."""
    path = Path(path)
    if not path.exists():
        raise PretextlabError(f"no study file at {path}: pass a YAML study file such as configs/mini-fashion.yaml")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PretextlabError(f"{path} is not valid YAML: {error}") from error
    try:
        return parse_study(data, path=path, out=out, text=text)
    except PretextlabError as error:
        raise PretextlabError(f"{path}: {error}") from error


def locate_study_store(path: str | Path) -> Path:
    """The store for a study file (its study directory's), a study directory, or a .sqlite file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return load_study(path).store_path
    return locate_store(path)


def expand_cells(study: Study) -> list[Cell]:
    """Every (task, network, width, representation size) of every grid, deduplicated by config hash."""
    from pretextlab.config import resolve

    outputs_cache: dict[str, tuple[str, ...]] = {}
    cells: dict[str, Cell] = {}
    for index, grid in enumerate(study.grids):
        for task in grid.tasks:
            for network in grid.networks:
                base, final_relu = network_name(network)
                for width in grid.widths:
                    for size in grid.representation_sizes:
                        fields = {**study.pretext, **grid.pretext}
                        fields.update(
                            task=task,
                            network=base,
                            final_relu=final_relu,
                            width=width,
                            representation_size=size,
                            device=study.runtime.device,
                            workers=study.runtime.workers,
                        )
                        try:
                            config = resolve(TrainConfig.from_dict(fields))
                        except PretextlabError as error:
                            raise PretextlabError(f"grids[{index}] cell {task} {network} k={width}: {error}") from error
                        config_hash = config.config_hash()
                        cell = cells.get(config_hash)
                        if cell is None:
                            cell = cells[config_hash] = Cell(
                                task=task,
                                network=network,
                                width=width,
                                representation_size=size,
                                config=config,
                                config_hash=config_hash,
                                run_dir=study.directory / RUNS_DIR / config_hash,
                                plan=[],
                            )
                        known = {job.key for job in cell.plan}
                        for job in _plan(study, task, network, width, size, outputs_cache):
                            if job.key not in known:
                                cell.plan.append(job)
                                known.add(job.key)
    return list(cells.values())


def _plan(
    study: Study, task: str, network: str, width: int, size: int | None, outputs_cache: dict[str, tuple[str, ...]]
) -> list[ProbeJob]:
    own_outputs = network_outputs(network, outputs_cache)
    jobs = []
    for evaluation in study.evaluations:
        if not evaluation.applies_to(task, network, width, size):
            continue
        outputs = own_outputs if "all" in evaluation.outputs else [o for o in own_outputs if o in evaluation.outputs]
        for dataset in evaluation.datasets:
            for probe in evaluation.probes:
                for labels in evaluation.labels:
                    for output in outputs:
                        jobs.append(
                            ProbeJob(dataset, output, probe, labels, l2_grid=evaluation.l2_grid, sgd=evaluation.sgd)
                        )
    return jobs


# -- status --------------------------------------------------------------------------------------


@dataclass
class CellStatus:
    cell: Cell
    state: str  # done / running / left
    status: str  # the store's status
    probes_done: int
    has_checkpoint: bool
    owner: str | None


def register(study: Study, store: ResultsStore, cells: list[Cell]) -> None:
    """Write the study and its cells (pending) into the store; existing rows keep their results."""
    store.set_meta("study_name", study.name)
    store.set_meta("study_text", study.text)
    store.set_meta("study_file", str(study.path) if study.path else "")
    store.set_meta("network_order", ",".join(dict.fromkeys(n for g in study.grids for n in g.networks)))
    store.set_meta("task_order", ",".join(dict.fromkeys(t for g in study.grids for t in g.tasks)))
    store.set_meta("dataset_order", ",".join(study.downstream))
    for cell in cells:
        store.register_run(
            cell.config_hash,
            task=cell.task,
            network=cell.network,
            width=cell.width,
            representation_size=cell.representation_size,
            config=cell.config.to_dict(),
            run_dir=str(cell.run_dir),
            plan=[job.key for job in cell.plan],
        )
    store.retire(cell.config_hash for cell in cells)


def study_status(study: Study, store: ResultsStore | None, cells: list[Cell]) -> list[CellStatus]:
    """Each cell's state as the store has it; a cell the store does not hold yet (or no store at
    all, for a dry run of a new study) is pending, and a finished cell with newly planned probes is left."""
    runs = {r["config_hash"]: r for r in store.runs()} if store is not None else {}
    statuses = []
    for cell in cells:
        run = runs.get(cell.config_hash)
        done_keys = store.probe_keys(cell.config_hash) if store is not None and run is not None else set()
        probes_done = sum(1 for job in cell.plan if job.key in done_keys)
        if run is None:
            state, status, owner = "left", "pending", None
        else:
            state, status, owner = store.cell_state(run, study.runtime.stale_seconds), run["status"], run["owner"]  # type: ignore[union-attr]
            if state == "done" and probes_done < len(cell.plan):
                state, status = "left", "pending"  # what register() will make of it
        statuses.append(
            CellStatus(
                cell=cell,
                state=state,
                status=status,
                probes_done=probes_done,
                has_checkpoint=(cell.run_dir / "checkpoint.pt").exists(),
                owner=owner,
            )
        )
    return statuses


def format_status(statuses: list[CellStatus]) -> str:
    lines = [f"{'cell':<40} {'hash':<12} {'state':<8} {'probes':>7}  detail"]
    for s in statuses:
        if s.state == "done":
            detail = "finished"
        elif s.state == "running":
            detail = f"held by {s.owner}"
        else:
            detail = {"failed": "failed earlier: will retry", "interrupted": "interrupted: will resume"}.get(s.status, "")
            if s.status == "running":
                detail = "its worker died or went silent: will resume"
            if s.has_checkpoint and not detail:
                detail = "has a checkpoint: will resume"
        lines.append(f"{s.cell.label:<40} {s.cell.config_hash:<12} {s.state:<8} {s.probes_done:>3}/{len(s.cell.plan):<3}  {detail}")
    counts = {state: sum(1 for s in statuses if s.state == state) for state in ("done", "running", "left")}
    lines.append(f"{len(statuses)} cells: {counts['done']} done, {counts['running']} running, {counts['left']} left")
    return "\n".join(lines)


# -- running one cell ----------------------------------------------------------------------------


class _Heartbeat:
    """Refreshes the cell's heartbeat from a background thread (its own connection) while it runs."""

    def __init__(self, store_path: Path, config_hash: str, owner: str, period: float = HEARTBEAT_SECONDS) -> None:
        self.store_path, self.config_hash, self.owner, self.period = store_path, config_hash, owner, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{config_hash}", daemon=True)

    def _run(self) -> None:
        store = ResultsStore(self.store_path)
        try:
            while not self.stop.wait(self.period):
                store.beat(self.config_hash, self.owner)
        finally:
            store.close()

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _finished_summary(cell: Cell) -> dict[str, Any] | None:
    from pretextlab.train import SUMMARY_FILE

    path = cell.run_dir / SUMMARY_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("config_hash") == cell.config_hash else None


def _train_cell(cell: Cell, store: ResultsStore, attempt: int, progress: bool) -> None:
    from pretextlab.train import Trainer, read_metrics

    summary = _finished_summary(cell)
    seconds = None
    if summary is None:
        # resume=True continues from the checkpoint when there is one and starts afresh otherwise.
        trainer = Trainer(cell.config, cell.run_dir, resume=True, progress=progress)
        store.set_attempt_start_step(attempt, trainer.step)
        started = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - started
    store.record_training(cell.config_hash, summary, seconds)
    store.add_curve_points(cell.config_hash, read_metrics(cell.run_dir))


def _probe_cell(study: Study, cell: Cell, store: ResultsStore, progress: bool) -> None:
    from pretextlab.evaluate.probe_run import EvalConfig, evaluate_run

    done = store.probe_keys(cell.config_hash)
    groups: dict[tuple[str, str, LabelBudget, tuple[float, ...] | None, SgdSettings | None], list[str]] = {}
    for job in cell.plan:
        if job.key not in done:
            groups.setdefault((job.dataset, job.probe, job.labels, job.l2_grid, job.sgd), []).append(job.output)
    for (dataset_name, probe, labels, l2_grid, sgd), outputs in groups.items():
        sgd = sgd or SgdSettings()
        dataset = study.downstream[dataset_name]
        eval_config = EvalConfig(
            outputs=tuple(outputs),
            probe=probe,
            dataset=dataset.dataset,
            data_dir=dataset.data_dir,
            val_size=dataset.val_size,
            limit=dataset.limit,
            test_limit=dataset.test_limit,
            labels_per_class=labels.per_class,
            label_fraction=labels.fraction,
            batch_size=study.runtime.feature_batch_size,
            device=study.runtime.device,
            seed=dataset.seed,
            l2_grid=l2_grid,
            sgd_schedule=sgd.schedule,
            sgd_epochs=sgd.epochs,
            sgd_batch_size=sgd.batch_size,
            sgd_base_lr=sgd.base_lr,
        )
        started = time.perf_counter()
        # One call per (dataset, probe, labels): the features of all its outputs come from one
        # pass over the images (cached in the run directory), and its results are stored at once.
        records = evaluate_run(cell.run_dir, eval_config, progress=progress)
        for record in records:
            record = dict(record, labels=labels.tag)
            store.add_probe_result(cell.config_hash, dataset_name, record)
        store.add_probe_seconds(cell.config_hash, time.perf_counter() - started)


def run_cell(study: Study, cell: Cell, progress: bool = True) -> str:
    """Train (or resume) one cell and fit its missing probes; returns finished, skipped or failed.

    A cell another live worker holds, or one already finished, is skipped. An exception from the
    cell's own work marks it failed (the message is kept in the store) and is re-raised; an
    interruption (Ctrl-C, SIGTERM) marks it interrupted, so the next run resumes it.
    """
    from pretextlab.train import Preempted

    owner = worker_id()
    with ResultsStore(study.store_path) as store:
        attempt = store.claim(cell.config_hash, owner, study.runtime.stale_seconds)
        if attempt is None:
            return "skipped"
        try:
            with _Heartbeat(study.store_path, cell.config_hash, owner):
                _train_cell(cell, store, attempt, progress)
                _probe_cell(study, cell, store, progress)
        except (KeyboardInterrupt, Preempted) as stop:
            store.end_attempt(cell.config_hash, attempt, "interrupted", error=str(stop) or type(stop).__name__)
            raise
        except BaseException as error:
            store.end_attempt(cell.config_hash, attempt, "failed", error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")
            raise
        store.end_attempt(cell.config_hash, attempt, "finished")
        return "finished"


def run_cell_job(study_file: str, out: str, config_hash: str) -> str:
    """A cluster job's entry point: re-read the study file and run one of its cells."""
    study = load_study(study_file, out=out)
    cells = {cell.config_hash: cell for cell in study.cells()}
    if config_hash not in cells:
        raise PretextlabError(f"{study_file} has no cell {config_hash} any more: the study file changed after submission")
    return run_cell(study, cells[config_hash], progress=False)


# -- running the study ---------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    statuses: list[CellStatus]
    ran: dict[str, str]  # config hash -> finished / skipped / failed
    errors: dict[str, str]
    job_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _make_executor(study: Study, kind: str) -> Any:
    try:
        import submitit
    except ImportError as error:
        raise PretextlabError("the local and slurm executors need submitit: pip install submitit (or use --executor inline)") from error
    folder = study.directory / SUBMITIT_DIR / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as error:  # e.g. no srun: not on a Slurm cluster
        raise PretextlabError(f"cannot use the {kind} executor here ({error}): run on the cluster's login node, or use --executor inline or local") from error
    parameters = {"name": f"pretextlab-{study.name}", **study.executor.parameters}
    if kind == "local":
        parameters.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError) as error:
        raise PretextlabError(f"executor.parameters {parameters} are not valid for submitit's {kind} executor: {error}") from error
    return executor


def run_study(
    study: Study,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    wait: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> StudyOutcome:
    """Show what is done / running / left, then run what is left (unless ``dry_run``).

    A dry run only reads: it creates no study directory and no store, and writes nothing into an
    existing store (the cells are registered when the study really starts).
    """
    kind = executor or study.executor.kind
    _choices([kind], EXECUTORS, "executor", "--executor")
    cells = study.cells()
    if dry_run:
        if study.store_path.exists():
            with ResultsStore(study.store_path, create=False) as store:
                statuses = study_status(study, store, cells)
        else:
            statuses = study_status(study, None, cells)
    else:
        with ResultsStore(study.store_path) as store:
            register(study, store, cells)
            statuses = study_status(study, store, cells)
    started = "" if study.store_path.exists() else "; not started yet"
    echo(f"study {study.name}: {study.directory} (store {study.store_path.name}{started})")
    echo(format_status(statuses))
    left = [s.cell for s in statuses if s.state == "left"]
    outcome = StudyOutcome(statuses=statuses, ran={}, errors={})
    if dry_run or not left:
        return outcome

    if kind == "inline":
        from pretextlab.train import Preempted

        bar = tqdm(left, desc=f"study {study.name}", unit="cell", disable=not progress, dynamic_ncols=True)
        for cell in bar:
            bar.set_postfix_str(cell.label)
            try:
                outcome.ran[cell.config_hash] = run_cell(study, cell, progress=progress)
            except Preempted:
                raise  # SIGTERM to the study itself: stop here, the next run resumes this cell
            except Exception as error:
                # One broken cell should not stop the rest of the grid; its message is in the store.
                outcome.ran[cell.config_hash] = "failed"
                outcome.errors[cell.config_hash] = f"{cell.label}: {error}"
                bar.write(f"cell {cell.label} ({cell.config_hash}) failed: {error}")
    else:
        submitter = _make_executor(study, kind)
        if study.path is None:
            raise PretextlabError("a study run on an executor needs a study file the jobs can read: use load_study(path)")
        jobs = submitter.map_array(
            run_cell_job, [str(study.path)] * len(left), [str(study.directory)] * len(left), [c.config_hash for c in left]
        )
        outcome.job_ids = [job.job_id for job in jobs]
        echo(f"submitted {len(jobs)} job(s) to the {kind} executor on {socket.gethostname()}: {', '.join(outcome.job_ids)}")
        if not wait:
            return outcome
        for cell, job in tqdm(list(zip(left, jobs)), desc=f"study {study.name}", unit="cell", disable=not progress):
            try:
                outcome.ran[cell.config_hash] = job.result()
            except Exception as error:  # submitit re-raises the job's failure here, with its log paths
                outcome.ran[cell.config_hash] = "failed"
                outcome.errors[cell.config_hash] = f"{cell.label}: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}"
    with ResultsStore(study.store_path) as store:
        outcome.statuses = study_status(study, store, cells)
    echo(format_status(outcome.statuses))
    for message in outcome.errors.values():
        echo(f"failed: {message}")
    return outcome
