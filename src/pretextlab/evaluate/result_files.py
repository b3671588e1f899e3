"""Stored probe results: the content keys, file names and records of evaluate's JSON results.

A result's file name ends in a short hash of everything that changes the number (the identity of
the weights probed, the dataset and its splits, the evaluation's recipe), so evaluations that
differ in any of these are kept side by side and a repeat of the same one replaces its file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from pretextlab import atomic
from pretextlab.data import DatasetSplits


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (dict order does not matter): cache keys and result file names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_tag(dataset: str, data_dir: str | None) -> str:
    """The dataset's part of a result's file name."""
    # Two folder datasets (ImageNet, Places205) must not share result files: name them by folder.
    return dataset if dataset != "folder" else f"folder-{Path(data_dir or 'data').name}"


def _stderr(message: str) -> None:
    print(f"pretextlab: {message}", file=sys.stderr, flush=True)


def store_results(
    results: dict[str, dict[str, Any]], probes_dir: Path, tag: str, config: Any, checkpoint: dict[str, Any],
    splits: DatasetSplits, fields: dict[str, Any], log: Callable[[str], None] = _stderr,
) -> list[dict[str, Any]]:
    """Write each output's record atomically as probes_dir/<tag>-<output>-<probe>-<labels>-<hash>.json.

    ``config`` is the evaluation's ``EvalConfig``; ``checkpoint`` is the identity of the weights
    probed (a run's checkpoint: step, SHA-256; or a backbone's name and weights hash): it is in the
    record and in the hash, so results of other weights never overwrite it.
    """
    recipe_hash = content_key(config.recipe(), checkpoint, splits.describe())
    stored = []
    for output, record in results.items():
        path = probes_dir / f"{tag}-{output}-{config.probe_tag()}-{config.label_tag()}-{recipe_hash}.json"
        record.update(
            **fields,
            eval_config=dataclasses.asdict(config),
            data=splits.describe(),
            checkpoint=checkpoint,
            recipe_hash=recipe_hash,
            result_file=str(path),
        )
        atomic.write_json(path, record)
        log(f"stored the {output} result ({record['test_top1_percent']:.2f}% test top-1) in {path}")
        stored.append(record)
    return stored
