"""Studies: the grid of pretext runs written down once, run, stopped, resumed, spread over a cluster.

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
        sgd: {schedule: paper, epochs: 35} # sgd / mlp probes: paper | paper_long, shortened in proportion;
                                           # preset: paper | precomputed (default: paper for folder)
    runtime: {device: auto, workers: null, feature_batch_size: 256, stale_seconds: 300}
    executor: {kind: inline}               # inline | local | slurm, with submitit parameters

One cell = one pretext run (keyed by its config hash, in STUDY_DIR/runs/<hash>/) plus its probes.
The results store (STUDY_DIR/results.sqlite, see study/store.py) records each cell's status and every
probe result as soon as its group finishes, so a study resumes where it stopped: a finished cell is
skipped, an interrupted pretext run resumes from its checkpoint, and finished probes are not redone.
Cells run one after another in this process (``inline``), or as parallel jobs through submitit's
local executor or its Slurm executor.

Modules: ``model`` (the study file's dataclasses), ``checks`` (YAML value checks), ``schema``
(parsing and validation), ``grid`` (cells), ``status``, ``cell`` (one cell's work), ``executors``
(inline, submitit local / Slurm), ``runner`` (run_study), ``store`` (the SQLite results store; it
imports no study code).
"""

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562), so importing the store (pretextlab.study.store) does not load the
# study file's parsing, the trainer or the networks.
_EXPORTS = {
    "Cell": "grid", "expand_cells": "grid",
    "StudyOutcome": "runner", "run_study": "runner",
    "load_study": "schema", "locate_study_store": "schema", "parse_study": "schema",
    "CellStatus": "status", "format_status": "status", "register": "status", "study_status": "status",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pretextlab.study' has no attribute {name!r}")
    return getattr(import_module(f"pretextlab.study.{_EXPORTS[name]}"), name)
