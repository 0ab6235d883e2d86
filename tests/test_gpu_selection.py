"""GPU selection: close GPUs first, lowest indices on ties."""

import itertools

from utopia_agent.gpus.selection import choose_gpus

SINGLE, MULTIPLE, SYSTEM = 10, 20, 50


def flat(a, b):
    return 0 if a == b else SYSTEM


def hgx(a, b):
    """Eight GPUs: pairs share a PCIe switch, four share a CPU socket."""
    if a == b:
        return 0
    if a // 2 == b // 2:
        return SINGLE
    if a // 4 == b // 4:
        return MULTIPLE
    return SYSTEM


def worst(gpus, distance):
    return max((distance(a, b) for a, b in itertools.combinations(gpus, 2)), default=0)


def test_flat_distances_take_lowest_free_indices():
    assert choose_gpus([5, 1, 7, 3, 2], 3, flat) == [1, 2, 3]


def test_zero_gpus_is_empty():
    assert choose_gpus([0, 1, 2], 0, hgx) == []


def test_one_gpu_is_the_lowest():
    assert choose_gpus([6, 2, 4], 1, hgx) == [2]


def test_all_candidates_when_count_matches():
    assert choose_gpus([3, 1, 2], 3, hgx) == [1, 2, 3]


def test_too_few_candidates_returns_all_without_raising():
    assert choose_gpus([4, 2], 5, hgx) == [2, 4]


def test_pair_on_one_switch_beats_lower_indices():
    # 0 and 2 are lowest but sit on different switches; 2 and 3 share one.
    assert choose_gpus([0, 2, 3], 2, hgx) == [2, 3]


def test_socket_mates_beat_lower_indices_across_sockets():
    # 1 and 4 are lowest but on different sockets; 4 and 6 share a socket.
    assert choose_gpus([1, 4, 6], 2, hgx) == [4, 6]


def test_four_gpus_stay_on_one_socket():
    chosen = choose_gpus([0, 1, 3, 4, 5, 6, 7], 4, hgx)
    assert chosen == [4, 5, 6, 7]
    assert worst(chosen, hgx) == MULTIPLE


def test_ties_between_equal_groups_go_to_lowest_indices():
    assert choose_gpus(list(range(8)), 2, hgx) == [0, 1]
    assert choose_gpus(list(range(8)), 4, hgx) == [0, 1, 2, 3]


def test_duplicates_in_candidates_are_ignored():
    assert choose_gpus([2, 2, 3, 3], 2, hgx) == [2, 3]


def test_matches_exhaustive_search_on_hgx_for_every_free_set():
    """For every free subset of eight GPUs and every count, the worst distance is optimal."""
    for size in range(1, 9):
        for free in itertools.combinations(range(8), size):
            for count in range(1, size + 1):
                chosen = choose_gpus(list(free), count, hgx)
                assert len(chosen) == count and set(chosen) <= set(free)
                best = min(worst(c, hgx) for c in itertools.combinations(free, count))
                assert worst(chosen, hgx) == best, (free, count, chosen)


def test_sixteen_gpus_is_cheap():
    calls = 0

    def counting(a, b):
        nonlocal calls
        calls += 1
        return hgx(a % 8, b % 8) if a // 8 == b // 8 else SYSTEM

    chosen = choose_gpus(list(range(16)), 8, counting)
    assert chosen == list(range(8))
    assert calls <= 16 * 16
