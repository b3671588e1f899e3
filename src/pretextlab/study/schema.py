"""Reading a study file: the YAML parsed, every section validated (unknown keys, choices, types), and
every cell's config resolved at once, so a mistake shows before any run starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.study.checks import (
    _as_list,
    _check_keys,
    _choices,
    _optional_number,
    _optional_string,
    _positive_ints,
    _section_list,
    _where,
    _wrong_type,
)
from pretextlab.study.grid import expand_cells, network_outputs, valid_network_names
from pretextlab.study.model import (
    EXECUTORS,
    STUDY_PROBES,
    DownstreamDataset,
    Evaluation,
    ExecutorSettings,
    Grid,
    LabelBudget,
    Runtime,
    SgdSettings,
    Study,
)
from pretextlab.study.store import locate_store

TOP_LEVEL_KEYS = ("name", "out", "pretext", "grids", "downstream", "evaluations", "runtime", "executor")
GRID_KEYS = ("tasks", "networks", "widths", "representation_sizes", "pretext")
DOWNSTREAM_KEYS = ("dataset", "data_dir", "val_size", "limit", "test_limit", "seed")
EVALUATION_KEYS = ("outputs", "probes", "labels", "datasets", "where", "l2_grid", "sgd")
SGD_KEYS = ("schedule", "epochs", "batch_size", "base_lr", "preset")
WHERE_KEYS = ("tasks", "networks", "widths", "representation_sizes")
RUNTIME_KEYS = ("device", "workers", "feature_batch_size", "stale_seconds")
EXECUTOR_KEYS = ("kind", "parameters")
# Set by the grid, never by the shared pretext section.
GRID_CONTROLLED = ("task", "network", "width", "final_relu", "representation_size")
# Runtime-only TrainConfig fields; they belong in the runtime section (they do not change results).
RUNTIME_CONTROLLED = ("device", "workers")
# The heartbeat period (cell.py) a stale limit must exceed.
HEARTBEAT_SECONDS = 20.0


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
    from pretextlab.evaluate.probe_run import SGD_PRESETS, SGD_SCHEDULES

    if value is None:
        return None
    section = _check_keys(value, SGD_KEYS, context)
    settings = SgdSettings(**section)
    _choices([settings.schedule], SGD_SCHEDULES, "SGD schedule", f"{context}.schedule")
    if settings.preset is not None:
        _choices([settings.preset], SGD_PRESETS, "SGD preset", f"{context}.preset")
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


def _check_job_shape(parameters: dict[str, Any]) -> None:
    """A cell's job: nodes x tasks_per_node DDP ranks (submitit's names), one rank per GPU."""
    for key, least in (("nodes", 1), ("tasks_per_node", 1), ("gpus_per_node", 0)):
        value = parameters.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PretextlabError(f"executor.parameters.{key} must be a whole number >= {least}, got {value!r}")
    gpus, tasks = parameters.get("gpus_per_node", 0), parameters.get("tasks_per_node", 1)
    if gpus and gpus != tasks:
        raise PretextlabError(
            f"executor.parameters: tasks_per_node ({tasks}) must equal gpus_per_node ({gpus}): a cell's job runs "
            f"one DDP rank per GPU, so set tasks_per_node: {gpus}"
        )


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
    _check_job_shape(executor.parameters)

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
    expand_cells(study)  # every cell's config is validated (resolve) now, not hours into the study
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
