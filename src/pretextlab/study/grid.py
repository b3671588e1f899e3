"""The grid of a study expanded into cells (one pretext run each, keyed by its config hash) with the
probes planned for each; network names with the "(-)" suffix and their outputs, from the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pretextlab.config import TrainConfig
from pretextlab.errors import PretextlabError
from pretextlab.study.model import RUNS_DIR, LabelBudget, ProbeJob, SgdSettings, Study
from pretextlab.study.store_format import probe_recipe_id

if TYPE_CHECKING:
    from pretextlab.evaluate.probe_run import EvalConfig

NO_FINAL_RELU_SUFFIX = "(-)"


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
                        known = {job.key: job for job in cell.plan}
                        for job in _plan(study, task, network, width, size, outputs_cache):
                            first = known.setdefault(job.key, job)
                            if first is job:
                                cell.plan.append(job)
                            elif first.recipe != job.recipe:
                                # One stored result per key: silently keeping the first recipe
                                # would report one evaluation's number under the other's settings.
                                raise PretextlabError(
                                    f"two evaluations ask for the {job.stored_probe} probe of "
                                    f"{job.output} on {job.dataset} with labels {job.labels.tag} for "
                                    f"{cell.label} with different settings (l2_grid or sgd): give them the "
                                    "same settings, or restrict one with where: / outputs: / labels: so they do not overlap"
                                )
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
                    config = probe_eval_config(study, dataset, probe, labels, evaluation.l2_grid, evaluation.sgd)
                    # What evaluate will store as the record's probe_config (the device is not in the id).
                    recipe = probe_recipe_id(dataclasses.asdict(config.probe_config()))
                    for output in outputs:
                        jobs.append(
                            ProbeJob(dataset, output, probe, labels, l2_grid=evaluation.l2_grid, sgd=evaluation.sgd,
                                     preset=_other_preset(study, dataset, probe, evaluation.sgd), recipe=recipe)
                        )
    return jobs


def probe_eval_config(
    study: Study, dataset: str, probe: str, labels: LabelBudget, l2_grid: tuple[float, ...] | None,
    sgd: SgdSettings | None, outputs: tuple[str, ...] = ("pre_logits",),
) -> "EvalConfig":
    """The evaluation a cell runs for these planned probes: one builder for the plan's recipe id and
    the cell's run, so the two never disagree on what a probe's recipe is."""
    from pretextlab.evaluate.probe_run import EvalConfig

    return EvalConfig(
        outputs=outputs,
        probe=probe,
        labels_per_class=labels.per_class,
        label_fraction=labels.fraction,
        batch_size=study.runtime.feature_batch_size,
        device=study.runtime.device,
        l2_grid=l2_grid,
        **study.downstream[dataset].eval_options(),
        **(sgd or SgdSettings()).eval_options(),
    )


def _other_preset(study: Study, dataset: str, probe: str, sgd: SgdSettings | None) -> str | None:
    """The SGD preset a probe job asks for when it is not its dataset's default (None otherwise)."""
    from pretextlab.evaluate.probe_run import EvalConfig

    if probe == "lbfgs" or sgd is None or sgd.preset is None:
        return None
    # The default comes from EvalConfig's own rule, so the study and `evaluate` never disagree on it.
    default = EvalConfig(probe=probe, dataset=study.downstream[dataset].dataset).resolved_sgd_preset()
    return None if sgd.preset == default else sgd.preset
