"""The Jigsaw permutation set: a maximal-Hamming-distance subset of the 9! orderings of 3x3 tiles.

Noroozi & Favaro 2016 (Algorithm 1) build the set greedily: start from one permutation drawn at
random, then repeatedly add the permutation, among all those not yet chosen, that is farthest from
the chosen set. "Farthest" has two readings, both offered:

- ``"mean"`` (default): the largest *sum* of Hamming distances to the chosen permutations. This is
  the paper's Algorithm 1 (``D̄ = 1ᵀD; j = argmax D̄``) and the procedure behind the
  ``permutations_100_max.bin`` file the study's released code loads.
- ``"min"``: the largest *minimum* Hamming distance to the chosen permutations (a max-min set);
  it guarantees a larger minimum pairwise distance, so no two classes are near-identical.

The published set itself is read (and written, for tests and conversions) by
``read_permutation_file`` / ``write_permutation_file``, in the released code's binary format; Jigsaw
uses it when given ``--permutations FILE``.

Ties (there are many: distances are small integers) are broken by the seeded RNG, so a (count,
seed, criterion) triple always gives the same set. The greedy step is vectorised over all 362,880
permutations, so a set of 100 takes well under a second; sets are cached on disk anyway
(``$PRETEXTLAB_CACHE`` or ``~/.cache/pretextlab``), written atomically.

A permutation ``p`` is read as "slot ``k`` shows grid cell ``p[k]``": the 9 patch features are
concatenated as ``features[p[0]], ..., features[p[8]]``, exactly as the released code's
``tf.gather(patches, perm)``. Undoing it: ``restored[p[k]] = shown[k]``, i.e. ``shown[argsort(p)]``.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretextlab.atomic import save_numpy, write_bytes
from pretextlab.errors import PretextlabError

GRID_CELLS = 9
CRITERIA = ("mean", "min")


@dataclass(frozen=True)
class PermutationSet:
    """A generated (or cached) permutation set and where it lives."""

    permutations: np.ndarray  # (count, 9) int64, each row a permutation of 0..8
    min_distance: int  # the smallest Hamming distance between two permutations of the set
    path: Path  # the cache file
    from_cache: bool  # True when the set was read from ``path`` rather than generated


def all_permutations(length: int = GRID_CELLS) -> np.ndarray:
    """Every ordering of ``range(length)`` in lexicographic order, as an (length!, length) int8 array."""
    return np.array(list(itertools.permutations(range(length))), dtype=np.int8)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, L) x (m, L) -> (n, m) number of positions where the two permutations differ."""
    return (a[:, None, :] != b[None, :, :]).sum(axis=-1)


def minimum_hamming_distance(permutations: np.ndarray) -> int:
    """The smallest Hamming distance between two distinct rows of ``permutations``."""
    permutations = np.asarray(permutations)
    if len(permutations) < 2:
        raise PretextlabError("a minimum pairwise distance needs at least 2 permutations")
    distances = hamming_distances(permutations, permutations)
    np.fill_diagonal(distances, permutations.shape[1] + 1)
    return int(distances.min())


def generate_permutations(
    count: int, seed: int = 0, criterion: str = "mean", length: int = GRID_CELLS
) -> np.ndarray:
    """The greedy maximal-Hamming-distance set of ``count`` permutations of ``range(length)``."""
    if criterion not in CRITERIA:
        raise PretextlabError(f"unknown permutation criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    total = math.factorial(length)
    if not 2 <= count <= total:
        raise PretextlabError(f"the number of permutations must be between 2 and {total}, got {count}")
    candidates = all_permutations(length)
    # Position-major copy: the distance to one permutation is then `length` contiguous compares.
    by_position = np.ascontiguousarray(candidates.T)

    def distances_to(index: int) -> np.ndarray:
        distance = np.zeros(total, dtype=np.int64)
        for position, value in enumerate(candidates[index]):
            distance += by_position[position] != value
        return distance

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(total))]
    available = np.ones(total, dtype=bool)
    available[chosen[0]] = False
    # Running score of every candidate against the chosen set: the sum or the minimum of its
    # Hamming distances, updated with one new row of distances per step.
    score = distances_to(chosen[0])
    for _ in range(count - 1):
        masked = np.where(available, score, -1)
        best = np.flatnonzero(masked == masked.max())
        pick = int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])
        chosen.append(pick)
        available[pick] = False
        distance = distances_to(pick)
        score = score + distance if criterion == "mean" else np.minimum(score, distance)
    return candidates[chosen].astype(np.int64)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRETEXTLAB_CACHE") or Path.home() / ".cache" / "pretextlab")


def permutation_set(
    count: int = 100,
    seed: int = 0,
    criterion: str = "mean",
    cache_dir: str | os.PathLike | None = None,
) -> PermutationSet:
    """The permutation set for (count, seed, criterion), from the cache or generated and cached."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / "permutations" / f"jigsaw_{criterion}_{count}_seed{seed}.npy"
    if path.exists():
        try:
            permutations = np.load(path)
        except (OSError, ValueError) as error:
            raise PretextlabError(f"the cached permutation set {path} is unreadable ({error}); delete it") from error
        if permutations.shape != (count, GRID_CELLS) or not _are_permutations(permutations):
            raise PretextlabError(
                f"the cached permutation set {path} has shape {permutations.shape} or invalid rows, "
                f"expected {count} permutations of 0..8; delete it to regenerate"
            )
        return PermutationSet(permutations.astype(np.int64), minimum_hamming_distance(permutations), path, True)
    permutations = generate_permutations(count, seed, criterion)
    save_numpy(path, permutations)
    return PermutationSet(permutations, minimum_hamming_distance(permutations), path, False)


def _are_permutations(rows: np.ndarray) -> bool:
    reference = np.arange(rows.shape[1])
    return bool((np.sort(rows, axis=1) == reference).all()) and len(np.unique(rows, axis=0)) == len(rows)


# The released set's file format (released code, self_supervision/patch_utils.py:218-234): two
# little-endian int32 (number of permutations, their length), then that many rows of int32 values,
# each row a permutation of the grid cells numbered 1..9 ("The bin file used index [1,9]").
_BIN_HEADER = struct.Struct("<ii")
_BIN_VALUE = np.dtype("<i4")


def read_permutation_file(path: str | os.PathLike) -> np.ndarray:
    """The (count, 9) int64 permutations (cells 0..8) of a file in the released binary format,
    e.g. the study's ``permutations_100_max.bin``; a clear error for anything else."""
    path = Path(path)
    fix = "give the released permutations_100_max.bin or a file in its format (docs/protocol.md, Jigsaw)"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PretextlabError(f"--permutations {path}: cannot read it ({error.strerror or error}); {fix}") from error
    if len(data) < _BIN_HEADER.size:
        raise PretextlabError(f"--permutations {path}: {len(data)} bytes is too short for the 8-byte header; {fix}")
    count, length = _BIN_HEADER.unpack_from(data)
    if length != GRID_CELLS or count < 2:
        raise PretextlabError(
            f"--permutations {path}: the header says {count} permutations of {length} cells; Jigsaw needs at least 2 "
            f"permutations of the {GRID_CELLS} grid cells (is this a file in the released format?); {fix}"
        )
    expected = _BIN_HEADER.size + count * length * _BIN_VALUE.itemsize
    if len(data) != expected:
        raise PretextlabError(
            f"--permutations {path}: {len(data)} bytes, but a header of {count} permutations of {length} means "
            f"{expected} bytes (truncated or not this format); {fix}"
        )
    rows = np.frombuffer(data, dtype=_BIN_VALUE, offset=_BIN_HEADER.size).reshape(count, length).astype(np.int64) - 1
    if not _are_permutations(rows):
        raise PretextlabError(
            f"--permutations {path}: every row must be a distinct ordering of the cells 1..{GRID_CELLS} "
            f"(the released numbering); {fix}"
        )
    return rows


def write_permutation_file(path: str | os.PathLike, permutations: np.ndarray) -> Path:
    """Write ``permutations`` (rows of cells 0..8) in the released binary format, atomically."""
    rows = np.asarray(permutations)
    if rows.ndim != 2 or rows.shape[1] != GRID_CELLS or not _are_permutations(rows):
        raise PretextlabError(f"cannot write {path}: expected distinct permutations of 0..{GRID_CELLS - 1}, got shape {rows.shape}")
    payload = _BIN_HEADER.pack(*rows.shape) + (rows + 1).astype(_BIN_VALUE).tobytes()
    return write_bytes(path, lambda handle: handle.write(payload))


def inverse_permutations(permutations: np.ndarray) -> np.ndarray:
    """Row-wise inverses: ``shown[inverse[p]]`` puts the patches back in grid order."""
    return np.argsort(permutations, axis=1)
