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

from .docker_manager import GPU_IDS_LABEL, PORTS_LABEL, VOLUMES_LABEL, ContainerSpec, DockerManager, Holdings
from .errors import AllocationBusy, ClaimExists, NodeFault, NoGpusFree, PolicyViolation, PortTaken
from .gpu_health import GpuHealth, views_of
from .gpu_sampler import GpuSample
from .gpu_selection import choose_gpus
from .gpus import gpu_keys, holders_of_containers
from .node_state import NodeDrain
from .policy import check_volumes_apart
from .volumes import MountPins, VolumeRefused

log = logging.getLogger("utopia_agent.allocator")


@contextmanager
def allocation_lock(state_dir: Path, timeout: float) -> Iterator[None]:
    """Hold the node-wide allocation lock: flock on the state dir itself, per open file, so threads
    exclude each other too.

    A lock file could be deleted or replaced while held, letting a second holder in on a new
    file; a directory that holds the agent's state cannot be removed under it. Should the path
    name another directory by the time the lock is taken, the lock is taken again there.
    """
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AllocationBusy("other creates hold the allocation lock; try again") from None
                    time.sleep(0.005)
            if _same_file(fd, state_dir):
                yield
                return
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


@dataclass(frozen=True)
class NodeAllocations:
    """Who holds which GPU and host port, as the engine's labels say."""

    gpu_holders: dict[str, tuple[str, ...]]
    port_holders: dict[tuple[int, str], str]
    volume_holders: dict[str, str]

    @classmethod
    def from_labels(cls, containers: list[tuple[str, dict[str, str]]]) -> "NodeAllocations":
        """Built from each managed container's id and labels, which record everything it holds."""
        gpus: dict[str, list[str]] = {}
        ports: dict[tuple[int, str], str] = {}
        volumes: dict[str, str] = {}
        for container_id, labels in containers:
            held = Holdings.from_labels(labels)
            for key in gpu_keys(held):
                gpus.setdefault(key, []).append(container_id)
            for mapping in held.port_mappings:
                ports[(mapping.host_port, mapping.protocol)] = container_id
            volumes.update(dict.fromkeys(held.volume_hosts, container_id))
        return cls({gpu: tuple(ids) for gpu, ids in gpus.items()}, ports, volumes)

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
    """Chooses GPUs, checks ports and pins volumes for a claim, and creates its container under the lock."""

    def __init__(self, state_dir: Path, docker: DockerManager, gpus: GpuHealth, node: NodeDrain, lock_timeout: float, pins: MountPins):
        self._state_dir = state_dir
        self._docker = docker
        self._gpus = gpus
        self._node = node
        self._lock_timeout = lock_timeout
        self._pins = pins

    def admit(self, gpu_count: int) -> None:
        """Refuse early (before any pull) what the lock would refuse anyway: any new claim while the
        node drains, and one that needs GPUs while NVML is hung. A claim that exists is told so
        first (409 claim_exists naming its container), so a caller's retry learns it either way."""
        self._node.refuse_if_draining()
        if gpu_count:
            self._gpus.sampler.for_allocation()

    def create(self, spec: ContainerSpec, gpu_count: int) -> tuple[str, ContainerSpec]:
        """Create the claim's container with `gpu_count` free GPUs; the lock spans decide + create.

        Each check reads the engine afresh: the claim by its container name, and only the
        containers that hold ports, GPUs or volumes (labels the others do not carry). NVML is
        never called here: the GPUs come from the sampler's last sample (503 while NVML is hung),
        and under the lock only UUIDs, holders, quarantines and cleanliness are compared.
        """
        sample = self._gpus.sampler.for_allocation() if gpu_count else None
        engine_root = self._docker.data_root() if spec.volumes else None
        with allocation_lock(self._state_dir, self._lock_timeout):
            holder = self._docker.find_claim(spec.claim_id, fresh=True)
            if holder:
                raise ClaimExists.held_by(spec.claim_id, holder)
            self._node.refuse_if_draining()
            if spec.port_mappings:
                self._check_ports(spec, NodeAllocations.from_labels(self._docker.holders_of(PORTS_LABEL)))
            if gpu_count:
                rows = self._docker.holders_of(GPU_IDS_LABEL)
                for gpu, holders in NodeAllocations.from_labels(rows).double_allocations().items():
                    log.error("gpu allocated twice gpu=%s containers=%s", gpu, ",".join(c[:12] for c in holders))
                spec = self._with_gpus(spec, gpu_count, sample, holders_of_containers(Holdings.from_labels(labels) for _, labels in rows))
            if not spec.volumes:
                return self._docker.create(spec), spec
            check_volumes_apart(spec.volumes, NodeAllocations.from_labels(self._docker.holders_of(VOLUMES_LABEL)).volume_holders, engine_root)
            spec = replace(spec, mount_sources=tuple(self._pin(spec)))
            try:
                return self._docker.create(spec), spec
            except BaseException:
                self._pins.release(spec.claim_id)
                raise

    def _pin(self, spec: ContainerSpec) -> list[str]:
        try:
            return self._pins.pin(spec.claim_id, spec.volumes)
        except VolumeRefused as refused:  # the path changed since the policy check
            raise PolicyViolation(f"volumes: {refused}", errors={"volumes": [str(refused)]}) from None
        except OSError as exc:
            log.error("volume pin failed claim=%s reason=%s", spec.claim_id, exc.strerror)
            raise NodeFault(f"the agent cannot pin the claim's volumes: {exc.strerror}") from None

    def release(self, claim_id: str) -> None:
        """Unpin a claim's volumes once it has no container (after a delete or a rolled-back start)."""
        if not self._pins.holds(claim_id):
            return
        with allocation_lock(self._state_dir, self._lock_timeout):
            if self._docker.find_claim(claim_id, fresh=True) is None:
                self._pins.release(claim_id)

    def sweep(self, max_created_age: float) -> None:
        """Remove containers created but never started for `max_created_age` seconds (a crash between
        create and start: they hold GPUs nobody uses) and the pins of claims that have no container."""
        with allocation_lock(self._state_dir, self._lock_timeout):
            for container_id, claim_id in self._docker.stale_created(max_created_age):
                log.warning("removing a container that never started claim=%s container=%s", claim_id, container_id[:12])
                self._docker.remove(container_id, grace_seconds=0)
            pinned = self._pins.claims()
            if pinned:
                live = {Holdings.from_labels(labels).claim_id for _, labels in self._docker.holders_of(VOLUMES_LABEL)}
                for claim_id in set(pinned) - live:
                    log.info("unpinning the volumes of a claim without a container claim=%s", claim_id)
                    self._pins.release(claim_id)

    @staticmethod
    def _check_ports(spec: ContainerSpec, allocations: NodeAllocations) -> None:
        for mapping in spec.port_mappings:
            holder = allocations.port_holders.get((mapping.host_port, mapping.protocol))
            if holder:
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is taken by container {holder[:12]}", host_port=mapping.host_port)
            if not port_is_free(mapping.host_port, mapping.protocol):
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is in use on the node", host_port=mapping.host_port)

    def _with_gpus(self, spec: ContainerSpec, gpu_count: int, sample: GpuSample, holders: dict[str, str]) -> ContainerSpec:
        """Only free GPUs (see gpu_health: not lost, quarantined, held or dirty) are candidates;
        quarantines are read here, under the lock, so one recorded before the lock is never missed."""
        views = views_of(sample, self._gpus.facts(), holders, self._gpus.records.read())
        uuids = {view.status.index: view.status.uuid for view in views}
        free = sorted(view.status.index for view in views if view.state == "free")
        if len(free) < gpu_count:
            raise NoGpusFree(
                f"{gpu_count} GPUs requested, {len(free)} free of {len(views)}",
                requested=gpu_count,
                free_gpus=len(free),
            )
        chosen = choose_gpus(free, gpu_count, self._gpus.sampler.inventory.distance)
        return replace(spec, gpu_ids=tuple(chosen), gpu_uuids=tuple(uuids[i] for i in chosen))
