"""The Jigsaw permutation set: valid, maximal-distance by the greedy rule, reproducible, cached."""

import itertools
import struct

import numpy as np
import pytest

from pretextlab.config import TrainConfig, resolve
from pretextlab.errors import PretextlabError
from pretextlab.tasks.jigsaw import JigsawOptions, JigsawTask
from pretextlab.tasks.permutations import (
    generate_permutations,
    inverse_permutations,
    minimum_hamming_distance,
    permutation_set,
    read_permutation_file,
    write_permutation_file,
)


def _pairwise_min_distance_by_loops(perms: np.ndarray) -> int:
    best = 10
    for a, b in itertools.combinations(perms.tolist(), 2):
        best = min(best, sum(x != y for x, y in zip(a, b)))
    return best


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, permutation_set(100, seed=0, cache_dir=cache)


def test_set_has_100_distinct_valid_permutations_and_the_stated_min_distance(default_set):
    _, chosen = default_set
    perms = chosen.permutations
    assert perms.shape == (100, 9)
    assert all(sorted(row) == list(range(9)) for row in perms.tolist())
    assert len({tuple(row) for row in perms.tolist()}) == 100
    assert chosen.min_distance == _pairwise_min_distance_by_loops(perms)
    assert chosen.min_distance == minimum_hamming_distance(perms)
    # The greedy sum rule spreads the set: the mean pairwise distance is close to the maximum of 9.
    mean = np.mean([sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(perms.tolist(), 2)])
    assert mean > 8.0


def test_identical_on_every_run_and_loaded_from_cache_the_second_time(default_set, tmp_path):
    cache, first = default_set
    assert not first.from_cache and first.path.exists() and first.path.is_relative_to(cache)
    again = permutation_set(100, seed=0, cache_dir=cache)
    assert again.from_cache and np.array_equal(again.permutations, first.permutations)
    assert again.min_distance == first.min_distance
    # Regenerated from scratch elsewhere: the very same set (seeded choice and tie-breaks).
    fresh = permutation_set(100, seed=0, cache_dir=tmp_path)
    assert not fresh.from_cache and np.array_equal(fresh.permutations, first.permutations)
    other_seed = generate_permutations(100, seed=1)
    assert not np.array_equal(other_seed, first.permutations)


def test_each_added_permutation_is_farthest_from_the_chosen_ones_by_the_sum_rule(default_set):
    perms = default_set[1].permutations
    every = np.array(list(itertools.permutations(range(9))))
    for step in range(1, 6):
        chosen = perms[:step]
        totals = (every[:, None, :] != chosen[None, :, :]).sum(axis=(1, 2))
        is_chosen = (every[:, None, :] == chosen[None, :, :]).all(axis=2).any(axis=1)
        best_available = totals[~is_chosen].max()
        assert (perms[step][None, :] != chosen).sum() == best_available
    # The second permutation is a derangement of the first (distance 9, the largest possible).
    assert (perms[0] != perms[1]).all()


def test_min_criterion_gives_a_max_min_set(tmp_path):
    chosen = permutation_set(100, seed=0, criterion="min", cache_dir=tmp_path)
    perms = chosen.permutations
    assert chosen.min_distance == _pairwise_min_distance_by_loops(perms)
    # Each addition's minimum distance to the earlier ones never increases (greedy max-min), and
    # the set beats the sum rule's minimum distance.
    mins = [min((perms[i] != perms[j]).sum() for j in range(i)) for i in range(1, 100)]
    assert all(a >= b for a, b in zip(mins, mins[1:]))
    assert chosen.min_distance >= 6 > minimum_hamming_distance(generate_permutations(100, seed=0))


def test_inverse_undoes_and_minimum_distance_of_a_known_pair():
    identity = np.arange(9)
    swapped = identity.copy()
    swapped[[0, 1]] = [1, 0]
    assert minimum_hamming_distance(np.stack([identity, swapped])) == 2
    perms = generate_permutations(5, seed=3)
    grid = np.arange(9) * 10
    shown = grid[perms]  # slot k shows cell perms[k]
    restored = np.take_along_axis(shown, inverse_permutations(perms), axis=1)
    assert (restored == grid).all()


def test_bad_requests_and_corrupt_cache_are_refused(tmp_path):
    with pytest.raises(PretextlabError, match="criterion"):
        generate_permutations(10, criterion="median")
    with pytest.raises(PretextlabError, match="between 2 and 362880"):
        generate_permutations(1)
    chosen = permutation_set(10, seed=0, cache_dir=tmp_path)
    np.save(chosen.path, np.zeros((10, 9), dtype=np.int64))
    with pytest.raises(PretextlabError, match="delete it"):
        permutation_set(10, seed=0, cache_dir=tmp_path)


def test_jigsaw_task_uses_the_cached_set_and_keeps_it_in_its_state(default_set):
    cache, chosen = default_set
    options = JigsawOptions(patch_size=16, embedding_dim=8, head_hidden=16, cache_dir=str(cache))
    task = JigsawTask(4, options)
    assert np.array_equal(task.permutations.numpy(), chosen.permutations)
    assert task.min_hamming_distance == chosen.min_distance
    assert "permutations" in task.state_dict()
    with pytest.raises(PretextlabError, match="permutations per batch"):
        JigsawTask(4, JigsawOptions(permutations_per_batch=101, cache_dir=str(cache)))


def _released_bin(path, rows, header=None) -> None:
    """A file in the released format, written by hand from patch_utils.load_permutations' reader:
    '<ll' (count, length), then count*length '<l' values numbering the cells 1..9."""
    rows = np.asarray(rows)
    count, length = header if header is not None else rows.shape
    path.write_bytes(struct.pack("<ll", count, length) + b"".join(struct.pack("<l", int(v) + 1) for v in rows.ravel()))


def test_jigsaw_reads_the_published_set_from_a_file_in_the_released_format(default_set, tmp_path):
    cache, chosen = default_set
    # A set the generator would never give (reversed order, different seed), so the file is what is used.
    published = permutation_set(100, seed=7, cache_dir=cache).permutations[::-1].copy()
    path = tmp_path / "permutations_100_max.bin"
    _released_bin(path, published)
    assert path.stat().st_size == 8 + 100 * 9 * 4
    assert np.array_equal(read_permutation_file(path), published)
    task = JigsawTask(4, JigsawOptions(patch_size=16, embedding_dim=8, head_hidden=16, cache_dir=str(cache), permutations=str(path)))
    assert np.array_equal(task.permutations.numpy(), published)
    assert task.min_hamming_distance == _pairwise_min_distance_by_loops(published)
    # The writer round-trips byte for byte with the hand-made file.
    write_permutation_file(tmp_path / "again.bin", published)
    assert (tmp_path / "again.bin").read_bytes() == path.read_bytes()


def test_a_wrong_permutation_file_gets_one_clear_error_naming_it(default_set, tmp_path):
    cache, chosen = default_set
    rows = chosen.permutations[:10]
    cases = {}
    _released_bin(tmp_path / "short.bin", rows[:0], header=(10, 9))
    cases["short.bin"] = "8 bytes, but a header of 10 permutations of 9 means 368 bytes"
    _released_bin(tmp_path / "eight.bin", rows[:, :8], header=(10, 8))
    cases["eight.bin"] = "10 permutations of 8 cells"
    (tmp_path / "tiny.bin").write_bytes(b"\x01\x00")
    cases["tiny.bin"] = "too short"
    _released_bin(tmp_path / "zero_based.bin", rows - 1)  # cells 0..8 written as stored here: not the released numbering
    cases["zero_based.bin"] = "cells 1..9"
    _released_bin(tmp_path / "repeated.bin", np.concatenate([rows[:9], rows[:1]]))
    cases["repeated.bin"] = "distinct ordering"
    cases["missing.bin"] = "cannot read it"
    for name, message in cases.items():
        with pytest.raises(PretextlabError, match=message) as error:
            read_permutation_file(tmp_path / name)
        assert f"--permutations {tmp_path / name}" in str(error.value) and "permutations_100_max.bin" in str(error.value)
    _released_bin(tmp_path / "ten.bin", rows)
    with pytest.raises(PretextlabError, match="holds 10 permutations but --num-permutations is 100: set --num-permutations 10"):
        JigsawOptions(permutations=str(tmp_path / "ten.bin")).check()
    task = JigsawTask(4, JigsawOptions(patch_size=16, embedding_dim=8, head_hidden=16, num_permutations=10,
                                       permutations=str(tmp_path / "ten.bin")))
    assert np.array_equal(task.permutations.numpy(), rows)


def test_the_permutation_file_is_recorded_as_a_real_path_and_refused_before_training(tmp_path, monkeypatch, default_set):
    _, chosen = default_set
    _released_bin(tmp_path / "set.bin", chosen.permutations)
    monkeypatch.chdir(tmp_path)
    config = resolve(TrainConfig(task="jigsaw", patch_size=16, permutations="set.bin"))
    assert config.permutations == str(tmp_path.resolve() / "set.bin")
    assert resolve(TrainConfig(task="jigsaw", patch_size=16)).permutations is None
    with pytest.raises(PretextlabError, match="--permutations .*nothing.bin: cannot read it"):
        resolve(TrainConfig(task="jigsaw", patch_size=16, permutations="nothing.bin"))
