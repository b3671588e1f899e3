"""Validation of the (features, labels) splits every probe takes, with errors that say the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

from pretextlab.errors import PretextlabError


def checked_split(split: Any, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise PretextlabError(f"{name} must be a pair (features (N, D), labels (N,)), got {type(split).__name__}")
    features, labels = split
    if not isinstance(features, np.ndarray):  # np.memmap is an ndarray and stays one (no copy)
        features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise PretextlabError(f"{name} features must be 2-d (N, D), got shape {features.shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise PretextlabError(f"{name} features must be numbers (float32 preferred), got {features.dtype}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise PretextlabError(f"{name} has {len(features)} feature rows but labels of shape {labels.shape}: give one label per row")
    if len(features) == 0 or features.shape[1] == 0:
        raise PretextlabError(f"{name} is empty (features of shape {features.shape}): it needs at least one row and one dimension")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PretextlabError(f"{name} labels must be integers (class ids), got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PretextlabError(f"{name} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}: check num_classes")
    return features, labels.astype(np.int64, copy=False)
