"""The study file's model: frozen dataclasses for its datasets, label budgets, probe jobs, evaluations,
grids, runtime and executor settings, and the study itself (parsed and checked by schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pretextlab.data.splits import label_budget_tag
from pretextlab.study.store import DEFAULT_STALE_SECONDS, STORE_FILE, PlannedProbe, ProbeKey

STUDY_PROBES = ("lbfgs", "sgd", "mlp")
EXECUTORS = ("inline", "local", "slurm")
RUNS_DIR = "runs"


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

    def eval_options(self) -> dict[str, Any]:
        """These settings as EvalConfig's fields of the same names (all but the study's ``name``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


@dataclass(frozen=True)
class LabelBudget:
    """All labels, N labels per class, or a fraction of the labels."""

    per_class: int | None = None
    fraction: float | None = None

    @property
    def tag(self) -> str:
        # The same function as EvalConfig.label_tag(), so store rows and plan rows match.
        return label_budget_tag(self.per_class, self.fraction)


@dataclass(frozen=True)
class SgdSettings:
    """The SGD-trained probes' (sgd, mlp) schedule: the study's 'paper' (70 epochs, batch 512) or
    'paper_long' (520 epochs, batch 2048), optionally shortened in proportion or re-batched; and
    their recipe (``preset``, EvalConfig.sgd_preset): 'paper' (the released one, features from
    random crops every epoch) or 'precomputed'; None: the dataset's default ('paper' for folder)."""

    schedule: str = "paper"
    epochs: int | None = None
    batch_size: int | None = None
    base_lr: float | None = None
    preset: str | None = None

    def eval_options(self) -> dict[str, Any]:
        """These settings as EvalConfig's fields: each field ``x`` is EvalConfig's ``sgd_x``."""
        return {f"sgd_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ProbeJob:
    """One planned probe result of a cell."""

    dataset: str  # the study's name of the downstream dataset
    output: str
    probe: str
    labels: LabelBudget
    l2_grid: tuple[float, ...] | None = field(default=None, compare=False)
    sgd: "SgdSettings | None" = field(default=None, compare=False)
    # An SGD preset other than the dataset's default (grid.py resolves it): the result is stored as
    # a probe of its own ("sgd-paper", "mlp-precomputed"), so a study whose preset changed makes a
    # new result instead of finding the other recipe's one done. The default keeps the plain name,
    # so stores made before presets keep their results.
    preset: str | None = None
    # The probe recipe's id (store_format.probe_recipe_id of the resolved probe config grid.py
    # builds, as evaluate stores it with the result): a stored result of another recipe (an edited
    # l2_grid, sgd schedule, epochs, batch size or learning rate) is not this job's. None: any.
    recipe: str | None = field(default=None, compare=False)

    @property
    def stored_probe(self) -> str:
        """The probe's name in the results store (and the report)."""
        return self.probe if self.preset is None else f"{self.probe}-{self.preset}"

    @property
    def key(self) -> ProbeKey:
        return (self.dataset, self.output, self.stored_probe, self.labels.tag)

    @property
    def planned(self) -> PlannedProbe:
        """The key and recipe, as the store's plan holds them."""
        return (*self.key, self.recipe)

    def done_in(self, stored: dict[ProbeKey, str | None]) -> bool:
        """Whether ``stored`` (``ResultsStore.probe_recipes``) has this job's result, of its recipe."""
        return self.key in stored and (self.recipe is None or stored[self.key] == self.recipe)


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
