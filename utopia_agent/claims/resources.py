"""CPU, memory and /dev/shm of a claim: its share of the node, what is still free, and where its
CPUs sit. Plain functions over the node's facts, so the allocator decides under its lock and
tests can state a topology the machine lacks.
"""

from __future__ import annotations

import math
import os
import resource
import stat
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..errors import NotEnoughResources

PINNING_MODES = ("numa", "exclusive", "none")
# Docker's own floor is 6 MiB; below this no job starts.
MIN_MEMORY_MB = 16
# NanoCPUs below a hundredth of a CPU are refused by the engine.
CPU_STEP = 0.01
CONTAINER_INFINIBAND_DIR = "/dev/infiniband"
_SYS_CPU = Path("/sys/devices/system/cpu")
_SYS_NODE = Path("/sys/devices/system/node")
_CAP_SYS_RESOURCE = 24
UNLIMITED = -1


@dataclass(frozen=True)
class NodeResources:
    """The CPUs the agent may use, the node's memory and its online memory nodes, read once per process."""

    cpus: tuple[int, ...]
    memory_mb: int
    # CPU -> the lowest CPU of its physical core, so cores are given whole (hyperthreads together).
    core_of: dict[int, int]
    # Online NUMA memory nodes; None where the kernel does not say.
    memory_nodes: frozenset[int] | None

    @classmethod
    def read(cls) -> NodeResources:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        return cls(
            cpus=cpus,
            memory_mb=psutil.virtual_memory().total // (1024 * 1024),
            core_of={cpu: _core_of(cpu) for cpu in cpus},
            memory_nodes=_online_memory_nodes(),
        )

    def capacity(self, reserved_cpus: float, reserved_memory_mb: int) -> tuple[float, int]:
        """What claims may have in all: the node less what is kept for the system."""
        return len(self.cpus) - reserved_cpus, self.memory_mb - reserved_memory_mb


def _core_of(cpu: int) -> int:
    try:
        siblings = parse_cpu_list((_SYS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
    except (OSError, ValueError):
        return cpu
    return min(siblings, default=cpu)


def _online_memory_nodes() -> frozenset[int] | None:
    try:
        return frozenset(parse_cpu_list((_SYS_NODE / "online").read_text()))
    except (OSError, ValueError):
        return None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """A Linux CPU list ("0-3,8,10-11") as sorted ids; "" is none."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(ids))


def format_cpu_list(ids) -> str:
    """Sorted ids as a Linux CPU list, runs folded into ranges: what cpuset files and the engine take."""
    runs: list[list[int]] = []
    for cpu in sorted(set(ids)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def gpu_share(capacity: tuple[float, int], gpu_count: int, node_gpus: int) -> tuple[float, int]:
    """A GPU claim's CPUs and memory: the claims' capacity times gpu_count / the node's GPUs,
    rounded down so that the shares of all GPUs never add up to more than the capacity."""
    cpus, memory_mb = capacity
    fraction = gpu_count / max(node_gpus, gpu_count)
    return (
        max(CPU_STEP, math.floor(cpus * fraction / CPU_STEP + 1e-9) * CPU_STEP),
        max(MIN_MEMORY_MB, int(memory_mb * fraction)),
    )


def default_shm_mb(memory_mb: int) -> int:
    """Half the memory limit (shm pages count against it): never Docker's 64 MiB, on which
    DataLoader workers die, and never more than the claim may hold."""
    return max(1, memory_mb // 2)


def check_fits(cpus: float | None, memory_mb: int | None, capacity: tuple[float, int], held_cpus: float, held_memory_mb: int) -> None:
    """Raise NotEnoughResources naming what is free when the claim's limits exceed it."""
    free_cpus = round(max(0.0, capacity[0] - held_cpus), 2)
    free_memory_mb = max(0, capacity[1] - held_memory_mb)
    short = []
    if cpus is not None and cpus > free_cpus + 1e-9:
        short.append(f"{cpus:g} CPUs requested, {free_cpus:g} free")
    if memory_mb is not None and memory_mb > free_memory_mb:
        short.append(f"{memory_mb} MB of memory requested, {free_memory_mb} free")
    if short:
        raise NotEnoughResources("; ".join(short) + " on the node", free_cpus=free_cpus, free_memory_mb=free_memory_mb)


def numa_placement(node: NodeResources, local_cpus: frozenset[int] | None, local_nodes: frozenset[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The CPUs and memory nodes local to the claim's GPUs that this node really has.

    NVML may name CPUs or nodes the agent cannot use (a cpuset around the agent, or a driver
    that counts offline CPUs): those are dropped, and nothing left means no placement at all.
    """
    cpus = tuple(sorted(set(node.cpus) & local_cpus)) if local_cpus else ()
    nodes = tuple(sorted(local_nodes & node.memory_nodes)) if local_nodes and node.memory_nodes is not None else ()
    return cpus, nodes


def reserved_cpu_ids(node: NodeResources, reserved_cpus: float) -> frozenset[int]:
    """The whole cores holding the node's lowest `reserved_cpus` CPUs, as kubelet keeps them for the system."""
    lowest = node.cpus[: math.ceil(reserved_cpus - 1e-9)]
    cores = {node.core_of[cpu] for cpu in lowest}
    return frozenset(cpu for cpu in node.cpus if node.core_of[cpu] in cores)


def choose_exclusive_cpus(node: NodeResources, count: int, local_cpus: frozenset[int] | None, taken: set[int], reserved: frozenset[int]) -> tuple[int, ...]:
    """Whole cores, local to the GPUs where NVML says so, that no pinned claim holds and the system
    does not keep: the fewest that give `count` CPUs, lowest first. NotEnoughResources otherwise."""
    usable = set(node.cpus) - reserved
    if local_cpus is not None:
        usable &= local_cpus
    cores: dict[int, list[int]] = {}
    for cpu in node.cpus:
        cores.setdefault(node.core_of[cpu], []).append(cpu)
    free_cores = [cpus for cpus in cores.values() if all(c in usable and c not in taken for c in cpus)]
    chosen: list[int] = []
    for cpus in free_cores:
        if len(chosen) >= count:
            break
        chosen.extend(cpus)
    free = sorted(c for cpus in free_cores for c in cpus)
    if len(chosen) < count:
        where = "near its GPUs" if local_cpus is not None else "on the node"
        raise NotEnoughResources(
            f"{count} whole CPUs requested, {len(free)} free {where} ({format_cpu_list(free) or 'none'})",
            free_cpus=float(len(free)),
            free_cpuset=format_cpu_list(free),
        )
    return tuple(sorted(chosen))


def infiniband_devices(directory: Path) -> tuple[str, ...]:
    """The character devices in the node's InfiniBand directory (uverbs, rdma_cm, ...), by name."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return ()
    return tuple(sorted(e.name for e in entries if stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode)))


def memlock_limit() -> int:
    """The memlock limit RDMA jobs get: unlimited where the node may raise limits (CAP_SYS_RESOURCE,
    which root has on a GPU node), else the node's hard limit, the most a container can start with."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        effective = 0
    if effective >> _CAP_SYS_RESOURCE & 1:
        return UNLIMITED
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return UNLIMITED if hard == resource.RLIM_INFINITY else hard
