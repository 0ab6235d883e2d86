"""Exclusive GPUs and host ports across every worker, decided under one file lock.

The engine's labels are the only record of what is allocated: a container that exists
holds its GPUs and ports, one that is gone frees them. The lock only serialises the
read-decide-create step, so two workers never decide on the same stale picture.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .docker_manager import GPU_IDS_LABEL, PORTS_LABEL, ContainerSpec, DockerManager, Holdings
from .errors import AllocationBusy, ClaimExists, NoGpusFree, PortTaken
from .gpu_selection import choose_gpus
from .gpus import GpuInventory, gpu_key_held, gpu_keys

log = logging.getLogger("utopia_agent.allocator")


@contextmanager
def allocation_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the node-wide allocation lock; flock is per open file, so threads exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AllocationBusy("other creates hold the allocation lock; try again") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class NodeAllocations:
    """Who holds which GPU and host port, as the engine's labels say."""

    gpu_holders: dict[str, tuple[str, ...]]
    port_holders: dict[tuple[int, str], str]

    @classmethod
    def from_labels(cls, containers: list[tuple[str, dict[str, str]]]) -> "NodeAllocations":
        """Built from each managed container's id and labels, which record everything it holds."""
        gpus: dict[str, list[str]] = {}
        ports: dict[tuple[int, str], str] = {}
        for container_id, labels in containers:
            held = Holdings.from_labels(labels)
            for key in gpu_keys(held):
                gpus.setdefault(key, []).append(container_id)
            for mapping in held.port_mappings:
                ports[(mapping.host_port, mapping.protocol)] = container_id
        return cls({gpu: tuple(ids) for gpu, ids in gpus.items()}, ports)

    def double_allocations(self) -> dict[str, tuple[str, ...]]:
        """GPUs that more than one container claims: reported, never silently merged."""
        return {gpu: ids for gpu, ids in self.gpu_holders.items() if len(ids) > 1}


def port_is_free(port: int, protocol: str) -> bool:
    """True when no process on the node holds the port (what the engine will need to bind)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if protocol == "tcp":
            # Closed connections in TIME_WAIT (a deleted claim's, say) do not keep the port from a new listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class Allocator:
    """Chooses GPUs and checks ports for a claim, and creates its container under the lock."""

    def __init__(self, lock_path: Path, docker: DockerManager, inventory: GpuInventory, lock_timeout: float):
        self._lock_path = lock_path
        self._docker = docker
        self._inventory = inventory
        self._lock_timeout = lock_timeout

    def held_gpu_keys(self) -> set[str]:
        """GPUs held by managed containers (see gpu_keys), for `busy`: from the listing, served from memory when exact."""
        return {key for container in self._docker.list_managed() for key in gpu_keys(container)}

    def create(self, spec: ContainerSpec, gpu_count: int) -> tuple[str, ContainerSpec]:
        """Create the claim's container with `gpu_count` free GPUs; the lock spans decide + create.

        Each check reads the engine afresh: the claim by its container name, and only the
        containers that hold ports or GPUs (labels the others do not carry).
        """
        with allocation_lock(self._lock_path, self._lock_timeout):
            holder = self._docker.find_claim(spec.claim_id, fresh=True)
            if holder:
                raise ClaimExists.held_by(spec.claim_id, holder)
            if spec.port_mappings:
                self._check_ports(spec, NodeAllocations.from_labels(self._docker.holders_of(PORTS_LABEL)))
            if gpu_count:
                allocations = NodeAllocations.from_labels(self._docker.holders_of(GPU_IDS_LABEL))
                for gpu, holders in allocations.double_allocations().items():
                    log.error("gpu allocated twice gpu=%s containers=%s", gpu, ",".join(c[:12] for c in holders))
                spec = self._with_gpus(spec, gpu_count, allocations)
            return self._docker.create(spec), spec

    @staticmethod
    def _check_ports(spec: ContainerSpec, allocations: NodeAllocations) -> None:
        for mapping in spec.port_mappings:
            holder = allocations.port_holders.get((mapping.host_port, mapping.protocol))
            if holder:
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is taken by container {holder[:12]}", host_port=mapping.host_port)
            if not port_is_free(mapping.host_port, mapping.protocol):
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is in use on the node", host_port=mapping.host_port)

    def _with_gpus(self, spec: ContainerSpec, gpu_count: int, allocations: NodeAllocations) -> ContainerSpec:
        gpus = {gpu.index: gpu for gpu in self._inventory.snapshot()}
        if not gpus:
            raise NoGpusFree(
                f"this node has no GPUs (GPU backend {self._inventory.backend})", requested=gpu_count, free_gpus=0
            )
        free = sorted(i for i, gpu in gpus.items() if gpu.healthy and gpu.uuid and not gpu_key_held(gpu, allocations.gpu_holders))
        if len(free) < gpu_count:
            raise NoGpusFree(
                f"{gpu_count} GPUs requested, {len(free)} free of {len(gpus)}",
                requested=gpu_count,
                free_gpus=len(free),
            )
        chosen = choose_gpus(free, gpu_count, self._inventory.distance)
        return replace(spec, gpu_ids=tuple(chosen), gpu_uuids=tuple(gpus[i].uuid for i in chosen))
