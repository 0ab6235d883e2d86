"""The resource arithmetic that needs no engine: CPU lists, shares, placement and whole cores on
topologies this machine lacks (two sockets, hyperthreads)."""

from __future__ import annotations

import pytest

from utopia_agent.errors import NotEnoughResources
from utopia_agent.claims.resources import (
    NodeResources,
    check_fits,
    choose_exclusive_cpus,
    default_shm_mb,
    format_cpu_list,
    gpu_share,
    numa_placement,
    parse_cpu_list,
    reserved_cpu_ids,
)


def node(cpus: int = 16, threads_per_core: int = 2, memory_nodes=frozenset({0, 1})) -> NodeResources:
    """`cpus` CPUs where CPU c and c + cpus/threads share a core, as Linux numbers hyperthreads."""
    cores = cpus // threads_per_core
    return NodeResources(tuple(range(cpus)), 65536, {c: c % cores for c in range(cpus)}, memory_nodes)


@pytest.mark.parametrize("text,ids", [("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)), ("", ()), ("5\n", (5,)), ("2,0-1", (0, 1, 2))])
def test_cpu_lists_read_and_write_as_the_kernel_does(text, ids):
    assert parse_cpu_list(text) == ids
    assert parse_cpu_list(format_cpu_list(ids)) == ids
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def test_shares_of_all_gpus_never_exceed_the_capacity():
    capacity = (13.0, 100_003)
    shares = [gpu_share(capacity, 1, 8) for _ in range(8)]
    assert sum(c for c, _ in shares) <= 13.0 and sum(m for _, m in shares) <= 100_003
    assert gpu_share(capacity, 1, 8) == (1.62, 12_500)
    assert gpu_share(capacity, 8, 8) == (13.0, 100_003)
    assert gpu_share((0.05, 64), 1, 8) == (0.01, 16), "never a zero limit, which the engine reads as none"


def test_shm_is_half_the_memory_limit():
    assert default_shm_mb(8192) == 4096
    assert default_shm_mb(1) == 1


def test_a_claim_beyond_what_is_free_names_what_is():
    check_fits(2.0, 1024, (4.0, 4096), 2.0, 3072)
    with pytest.raises(NotEnoughResources) as refused:
        check_fits(2.5, 512, (4.0, 4096), 2.0, 3072)
    assert refused.value.details == {"free_cpus": 2.0, "free_memory_mb": 1024}
    assert "2.5 CPUs requested, 2 free" in refused.value.message


def test_numa_placement_drops_what_the_node_lacks():
    small = node(cpus=2, threads_per_core=1, memory_nodes=frozenset({0}))
    assert numa_placement(small, frozenset(range(32)), frozenset({0})) == ((0, 1), (0,))
    assert numa_placement(small, frozenset(range(32, 64)), frozenset({1})) == ((), ())
    assert numa_placement(small, None, None) == ((), ())
    unknown_nodes = node(cpus=2, threads_per_core=1, memory_nodes=None)
    assert numa_placement(unknown_nodes, frozenset({1}), frozenset({0})) == ((1,), ())


def test_exclusive_cores_are_whole_and_local():
    smt = node()  # 8 cores: CPU c pairs with c + 8; socket 0 is cores 0-3
    socket0 = frozenset({0, 1, 2, 3, 8, 9, 10, 11})
    assert choose_exclusive_cpus(smt, 3, socket0, set(), frozenset()) == (0, 1, 8, 9), "two whole cores for three CPUs"
    assert choose_exclusive_cpus(smt, 2, socket0, {0, 9}, frozenset()) == (2, 10), "a core with a taken thread is not free"
    with pytest.raises(NotEnoughResources) as refused:
        choose_exclusive_cpus(smt, 4, socket0, {0, 1, 2}, frozenset())
    assert refused.value.details["free_cpuset"] == "3,11"


def test_the_system_keeps_whole_cores_at_the_bottom():
    smt = node()
    assert reserved_cpu_ids(smt, 1) == {0, 8}
    assert reserved_cpu_ids(smt, 1.5) == {0, 1, 8, 9}
    assert reserved_cpu_ids(smt, 0) == frozenset()
    assert choose_exclusive_cpus(smt, 2, None, set(), reserved_cpu_ids(smt, 1)) == (1, 9)
