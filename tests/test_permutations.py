"""The Jigsaw permutation set: valid, maximal-distance by the greedy rule, reproducible, cached."""

import itertools

import numpy as np
import pytest

from pretextlab.errors import PretextlabError
from pretextlab.tasks.jigsaw import JigsawOptions, JigsawTask
from pretextlab.tasks.permutations import (
    generate_permutations,
    inverse_permutations,
    minimum_hamming_distance,
    permutation_set,
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
