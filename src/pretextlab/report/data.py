"""What the report reads from a results store, indexed the ways its tables and figures need."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pretextlab.errors import PretextlabError
from pretextlab.study.store import ResultsStore

# The paper's orders; names a study adds beyond these follow in the study file's order.
TASK_ORDER = ("rotation", "exemplar", "relative_patch", "jigsaw")
NETWORK_ORDER = ("resnet50v1", "resnet50v2", "resnet50v2(-)", "revnet50", "revnet50(-)", "vgg19bn")
OUTPUT_ORDER = ("block1", "block2", "block3", "block4", "block5", "fc6", "pre_logits")
TASK_TITLES = {"rotation": "Rotation", "exemplar": "Exemplar", "relative_patch": "Rel. Patch Loc.", "jigsaw": "Jigsaw"}


def _ordered(names: Iterable[str], preferred: Sequence[str], study_order: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    rank = {n: i for i, n in enumerate(list(preferred) + [n for n in study_order if n not in preferred])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "dataset"


@dataclass
class StudyData:
    """Everything the report reads from the store, indexed the ways the tables and figures need."""

    name: str
    runs: dict[str, dict[str, Any]]  # the cells of the study file's current grid
    retired: dict[str, dict[str, Any]]  # cells the study file no longer names (listed, not tabulated)
    probes: list[dict[str, Any]]
    plan: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    tasks: list[str]
    networks: list[str]
    datasets: list[str]

    @classmethod
    def load(cls, store: ResultsStore) -> "StudyData":
        everything = store.runs()
        runs = {r["config_hash"]: r for r in everything if r["in_study"]}
        retired = {r["config_hash"]: r for r in everything if not r["in_study"]}
        probes = [p for p in store.probes() if p["config_hash"] in runs]
        plan = [p for p in store.planned() if p["config_hash"] in runs]
        split = lambda key: [v for v in (store.get_meta(key) or "").split(",") if v]  # noqa: E731
        tasks = _ordered((r["task"] for r in runs.values()), TASK_ORDER, split("task_order"))
        networks = _ordered((r["network"] for r in runs.values()), NETWORK_ORDER, split("network_order"))
        dataset_names = [p["dataset"] for p in plan] + [p["dataset"] for p in probes]
        datasets = _ordered(dataset_names, split("dataset_order"), [])
        return cls(
            name=store.get_meta("study_name") or store.path.parent.name,
            runs=runs,
            retired=retired,
            probes=probes,
            plan=plan,
            curves=[c for c in store.curves() if c["config_hash"] in runs],
            tasks=tasks,
            networks=networks,
            datasets=datasets,
        )

    def result(self, config_hash: str, dataset: str, output: str, probe: str, labels: str = "all") -> dict[str, Any] | None:
        for row in self.probes:
            if (row["config_hash"], row["dataset"], row["output"], row["probe"], row["labels"]) == (
                config_hash, dataset, output, probe, labels
            ):
                return row
        return None

    def natural_runs(self) -> list[dict[str, Any]]:
        """Runs without a representation-size layer (the main grid)."""
        return [r for r in self.runs.values() if r["representation_size"] is None]

    def largest_width(self, network: str) -> int | None:
        widths = [r["width"] for r in self.natural_runs() if r["network"] == network]
        return max(widths) if widths else None

    def find_run(self, task: str, network: str, width: int | None, size: int | None = None) -> dict[str, Any] | None:
        for run in self.runs.values():
            if (run["task"], run["network"], run["width"], run["representation_size"]) == (task, network, width, size):
                return run
        return None

    def run_label(self, config_hash: str) -> str:
        run = self.runs[config_hash]
        size = f" d={run['representation_size']}" if run["representation_size"] else ""
        return f"{run['task']} {run['network']} k={run['width']}{size}"


def is_backbone_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the --out directory of `evaluate --backbone` (results in probes/, no study store)."""
    probes = Path(path) / "probes"
    return Path(path).is_dir() and probes.is_dir() and any(probes.glob("*.json")) and not (Path(path) / "results.sqlite").exists()


def backbone_label(record: dict[str, Any]) -> str:
    """How a report names the weights a backbone result came from."""
    identity = record.get("checkpoint") or {}
    if identity.get("weights") == "random-init":
        return f"random init (seed {identity.get('init_seed')})"
    name = Path(record.get("weights_file") or "weights").name
    return f"{name} (sha256 {str(identity.get('sha256'))[:12]})"


def backbone_results(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """The stored results of `pretextlab evaluate --backbone ... --out DIR` for each DIR, in a stable order."""
    records = []
    for folder in dirs:
        files = sorted((Path(folder) / "probes").glob("*.json"))
        found = []
        for path in files:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise PretextlabError(f"cannot read the backbone result {path} ({error}): delete it or evaluate again") from error
            if isinstance(record, dict) and record.get("backbone"):
                found.append(record)
        if not found:
            raise PretextlabError(
                f"{folder} holds no `evaluate --backbone` results (DIR/probes/*.json): run "
                f"`pretextlab evaluate --backbone LIB:NAME --out {folder}` first"
            )
        records += found
    last = {"pre_logits": 1}  # the earlier layers first, as the study's tables list outputs
    return sorted(records, key=lambda r: (r["backbone"], backbone_label(r), r.get("dataset") or "", r.get("probe") or "",
                                          r.get("labels") or "", last.get(r.get("output"), 0), r.get("output") or ""))
