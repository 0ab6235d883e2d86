"""Exclusive GPUs, host ports, CPUs and memory across every worker, decided under one file lock.

The engine's labels are the only record of what is allocated: a container that exists
holds its GPUs and ports, one that is gone frees them. The lock only serialises the
read-decide-create step, so two workers never decide on the same stale picture: the
picture is the node view, kept from the engine's events, once it shows every create and
start made under the lock (NodeView.snapshot_for_allocation), else one list of the engine.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from collections.abc import Iterable, Iterator

from ..config import Config
from ..engine.manager import DockerManager
from ..errors import (
    NO_SPACE, AgentError, AllocationBusy, ClaimExists, NodeFault, NoGpusFree, NotEnoughResources, NotManaged, PolicyViolation, PortTaken,
    VolumeInUse, VolumeNotFound,
)
from ..gpus.health import GpuHealth, views_of
from ..gpus.sampler import GpuSample
from ..gpus.selection import choose_gpus
from ..gpus.inventory import GpuInventory, Locality
from ..claims.holders import carrying, claim_volume_users, exclusive_cpus, gpu_claims, gpu_keys, gpus_held_twice, port_holders, volume_holders
from ..node.drain import NodeDrain
from .policy import check_volumes_apart
from ..claims.disks import DiskLedger, disk_share
from ..claims.records import (
    CLAIM_LABEL, CLAIM_VOLUMES_LABEL, CPUS_LABEL, GPU_IDS_LABEL, MANAGED_LABEL, MEMORY_LABEL, PORTS_LABEL, REQUESTED_STOP, RUNNING_STATES,
    STOP_REASON_PATTERN, VOLUMES_LABEL,
    ContainerSpec, Holdings, ManagedContainer, PortMapping, StopMark,
)
from ..disks.node_disk import NodeDisk
from ..node.state_file import StateFile
from ..claims.resources import (
    NodeResources, check_fits, choose_exclusive_cpus, default_shm_mb, format_cpu_list, gpu_share, numa_placement, reserved_cpu_ids,
)
from ..claims.volumes import MountPins, VolumeRefused
from ..volumes.store import VolumeStore

log = logging.getLogger("utopia_agent.allocator")

# What a decision refuses over what other claims hold: a view a moment behind may still show a holder that went.
HELD_BY_OTHERS = (ClaimExists, NoGpusFree, NotEnoughResources, PortTaken, VolumeInUse, PolicyViolation)


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
    """Chooses GPUs, CPUs, memory and disk, checks ports and pins volumes for a claim, and creates
    its container under the lock."""

    def __init__(
        self, config: Config, docker: DockerManager, gpus: GpuHealth, drain: NodeDrain, lock: Callable[[], AbstractContextManager],
        pins: MountPins, node: NodeResources, disk: NodeDisk, volumes: VolumeStore | None = None,
    ):
        """`lock`: the node's allocation lock (allocation_lock on the state dir), as every other holder takes it."""
        self._config = config
        self._docker = docker
        self._gpus = gpus
        self._drain = drain
        self._lock = lock
        self._pins = pins
        self._node = node
        self.disk = disk
        self._volumes = volumes
        # The name of the container being created under the lock, while the engine makes it.
        self._in_flight = StateFile(config.state_dir / "create-in-flight.json")

    def admit(self, gpu_count: int) -> None:
        """Refuse early (before any pull) what the lock would refuse anyway: any new claim while the
        node drains, and one that needs GPUs while NVML is hung. A claim that exists is told so
        first (409 claim_exists naming its container), so a caller's retry learns it either way."""
        self._drain.refuse_if_draining()
        if gpu_count:
            self._gpus.sampler.for_allocation()

    def create(self, spec: ContainerSpec, gpu_count: int) -> tuple[str, ContainerSpec]:
        """Create the claim's container with `gpu_count` free GPUs; the lock spans decide + create.

        Each check reads one picture of the managed containers taken under the lock, which shows the
        claim's container and every port, GPU, CPU, memory and volume held: the node view when it
        shows every change made under the lock, else the engine's list (DockerManager.holders_now). NVML is never
        called here: the GPUs come from the sampler's last sample (503 while NVML is hung), and
        under the lock only UUIDs, holders, quarantines and cleanliness are compared.
        """
        sample = self._gpus.sampler.for_allocation() if gpu_count else None
        engine_root = self._docker.data_root() if spec.volumes else None
        disk_quota = self.disk.quota().mode
        with self._lock():
            self._settle_interrupted_create()
            held, from_view = self._docker.holders_now()
            try:
                spec = self._decide(spec, gpu_count, sample, held, disk_quota, engine_root)
            except HELD_BY_OTHERS:
                if not from_view:
                    raise
                # The view may still show a container that went a moment ago (removed behind the
                # agent's back): a refusal over what others hold is only answered once the engine confirms it.
                spec = self._decide(spec, gpu_count, sample, self._docker.holders_now(engine=True)[0], disk_quota, engine_root)
            if not spec.volumes:
                return self._create(spec), spec
            spec = replace(spec, mount_sources=tuple(self._pin(spec)))
            try:
                return self._create(spec), spec
            except BaseException:
                self._pins.release(spec.claim_id)
                raise

    def _decide(self, spec: ContainerSpec, gpu_count: int, sample: GpuSample | None, held: Callable[[str], list[Holdings]],
                disk_quota: str, engine_root: str | None) -> ContainerSpec:
        """The claim's GPUs, ports, CPUs, memory, disk and volumes, checked against what `held` says the other claims hold."""
        if claimed := held(f"{CLAIM_LABEL}={spec.claim_id}"):
            raise ClaimExists.held_by(spec.claim_id, claimed[0].container_id, claimed[0].spec_digest == spec.spec_digest)
        self._drain.refuse_if_draining()
        if spec.port_mappings:
            self._check_ports(spec.port_mappings, port_holders(held(PORTS_LABEL)))
        limited = self._resource_holders(held(CPUS_LABEL), held(MEMORY_LABEL))
        if gpu_count:
            gpu_holders = held(GPU_IDS_LABEL)
            for gpu, holders in gpus_held_twice(gpu_holders).items():
                log.error("gpu allocated twice gpu=%s containers=%s", gpu, ",".join(c[:12] for c in holders))
            spec = self._with_gpus(spec, gpu_count, sample, gpu_claims(gpu_holders), self._has_free_cores(limited))
        spec = self._with_resources(spec, len(sample.gpus) if sample else 0, limited)
        spec = self._with_disk(spec, len(sample.gpus) if sample else 0, held(MANAGED_LABEL), disk_quota)
        if spec.mounts:
            spec = self._with_claim_volumes(spec, held(CLAIM_VOLUMES_LABEL))
        if spec.volumes:
            check_volumes_apart(spec.volumes, volume_holders(held(VOLUMES_LABEL)), engine_root)
        return spec

    def _with_claim_volumes(self, spec: ContainerSpec, holders: list[Holdings]) -> ContainerSpec:
        """Each claim volume exists and is whole (404 otherwise), is mounted read-write by no other
        claim, and, for a read-write mount, by no other claim at all (409 volume_in_use naming it)."""
        if self._volumes is None:
            raise VolumeNotFound(f"no volume {spec.mounts[0].volume!r}: this agent keeps no claim volumes", volume=spec.mounts[0].volume)
        users = claim_volume_users(holders)
        sources = []
        for mount in spec.mounts:
            sources.append(self._volumes.source(mount.volume))
            others = sorted(users.get(mount.volume, []))
            writer = next((claim for claim, read_only in others if not read_only), None)
            holder = writer or (others[0][0] if others and not mount.read_only else None)
            if holder is not None:
                how = "read-write" if writer else "read-only"
                raise VolumeInUse(f"volume {mount.volume} is mounted {how} by claim {holder}", volume=mount.volume, claim_id=holder)
        return replace(spec, claim_mount_sources=tuple(sources))

    def _create(self, spec: ContainerSpec) -> str:
        """The engine's create, with the container's name on record while the engine makes it: a
        worker killed meanwhile releases the lock at once, but the engine may still finish."""
        self._in_flight.write({"name": spec.name, "pid": os.getpid()}, durable=False)
        try:
            return self._docker.create(spec)
        finally:
            self._in_flight.remove()

    def _settle_interrupted_create(self) -> None:
        """A record left by a holder of the lock that died while the engine made its container: wait
        (up to the engine timeout) for the engine to finish and remove the container, which nobody
        was told of, before deciding; else the next list could miss it and give its GPUs again."""
        interrupted = self._in_flight.read()
        if not interrupted:
            return
        name = interrupted.get("name", "")
        removed = self._docker.remove_if_created(name, wait_seconds=self._config.engine_timeout)
        log.warning("a create interrupted by its worker's death pid=%s container=%s: %s", interrupted.get("pid"), name,
                    "removed" if removed else "the engine never made it")
        self._in_flight.remove()

    def _pin(self, spec: ContainerSpec) -> list[str]:
        try:
            return self._pins.pin(spec.claim_id, spec.volumes)
        except VolumeRefused as refused:  # the path changed since the policy check
            raise PolicyViolation(f"volumes: {refused}", errors={"volumes": [str(refused)]}) from None
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise  # the state dir (where pins live) is full: 507 naming it, as any write of the agent's
            log.error("volume pin failed claim=%s reason=%s", spec.claim_id, exc.strerror)
            raise NodeFault(f"the agent cannot pin the claim's volumes: {exc.strerror}") from None

    def stop(self, container_id: str, reason: str = REQUESTED_STOP, grace_seconds: int | None = None) -> ManagedContainer:
        """Stop a claim's container and keep it, its writable layer and its volumes; once it no
        longer runs its GPUs (then `releasing` until NVML shows them clean, as after a delete), its
        ports and its CPUs are free. `reason` is `requested` for the API's stop, or the agent's own
        (`disk_limit_exceeded`, ...), which the container's `error` then shows.

        The mark (name and restart policy, see DockerManager.mark_stopped) is put on under the lock,
        before the engine stops it: a container that still runs holds everything, so no moment
        exists in which another claim could be given what a running container uses."""
        if not re.fullmatch(STOP_REASON_PATTERN, reason):
            raise ValueError(f"not a stop reason: {reason!r}")
        container = self._docker.get_managed(container_id)
        with self._lock():
            self._docker.mark_stopped(container, reason)
        self._docker.stop(container.id, grace_seconds)
        stopped = self._docker.get_managed(container.id)
        log.info("container stopped claim=%s container=%s reason=%s gpus=%s", container.claim_id, container.id[:12], reason,
                 ",".join(map(str, container.gpu_ids)) or "-", extra={"claim_id": container.claim_id, "container_id": container.id})
        return stopped

    def start(self, container_id: str) -> ManagedContainer:
        """Start a claim's container again with the GPUs, ports and CPUs it was made with, once the
        lock shows no other claim holding any of them (409 naming the holder), while the node is not
        draining. A container that runs already is answered as it is."""
        container = self._docker.get_managed(container_id)
        with self._lock():
            self._settle_interrupted_create()
            rows = self._docker.managed_rows()
            row = next((row for row in rows if row["Id"] == container.id), None)
            if row is None:
                raise NotManaged(f"no managed container {container_id!r}")
            if row.get("State") in RUNNING_STATES:
                return container
            self._drain.refuse_if_draining()
            mark = StopMark.parse(next(iter(row.get("Names") or ()), "").lstrip("/"), container.claim_id)
            others = [held for held in carrying(rows, MANAGED_LABEL) if held.container_id != container.id]
            self._check_taken_back(Holdings.from_labels(container.labels, container.id), others)
            before = container.state if mark is None else self._docker.unmark_stopped(container, mark)
        try:
            self._docker.start(container.id, before)
        except BaseException:
            if mark is not None:
                with self._lock():
                    self._docker.mark_stopped(container, mark.reason)
            raise
        log.info("container started claim=%s container=%s gpus=%s", container.claim_id, container.id[:12],
                 ",".join(map(str, container.gpu_ids)) or "-", extra={"claim_id": container.claim_id, "container_id": container.id})
        return self._docker.get_managed(container.id)

    def _check_taken_back(self, wanted: Holdings, others: list[Holdings]) -> None:
        """What a stopped claim takes back is free: its GPUs held by no other claim and not
        quarantined or lost, its ports, its exclusive CPUs, and room for its CPU and memory limits."""
        holders = gpu_claims(others)
        sample = self._gpus.sampler.for_allocation() if wanted.gpu_ids else None
        views = {view.status.uuid: view for view in views_of(sample, self._gpus.facts(), holders, self._gpus.records.read())} if sample else {}
        for index, key in zip(wanted.gpu_ids, gpu_keys(wanted), strict=True):
            if (holder := holders.get(key)) is not None:
                raise NoGpusFree(f"GPU {index} ({key}) is held by claim {holder}", requested=len(wanted.gpu_ids), claim_id=holder)
            view = views.get(key)
            if view is not None and view.state in ("quarantined", "lost"):
                raise NoGpusFree(f"GPU {index} ({key}) is {view.state}: {view.reason}", requested=len(wanted.gpu_ids))
        self._check_ports(wanted.port_mappings, port_holders(others))
        taken = set(wanted.exclusive_cpus) & exclusive_cpus(others)
        if taken:
            holder = next(held.claim_id for held in others if taken & set(held.exclusive_cpus))
            raise NotEnoughResources(f"CPUs {format_cpu_list(tuple(sorted(taken)))} are held by claim {holder}", claim_id=holder)
        if wanted.cpus or wanted.memory_mb:
            capacity = self._node.capacity(self._config.reserved_cpus, self._config.reserved_memory_mb)
            check_fits(wanted.cpus or None, wanted.memory_mb or None, capacity, sum(h.cpus for h in others), sum(h.memory_mb for h in others))

    def release(self, claim_id: str) -> None:
        """Unpin a claim's volumes once it has no container (after a delete or a rolled-back start)."""
        if not self._pins.holds(claim_id):
            return
        with self._lock():
            if self._docker.find_claim(claim_id, fresh=True) is None:
                self._pins.release(claim_id)

    def sweep(self, max_created_age: float) -> None:
        """Remove containers created but never started for `max_created_age` seconds (a crash between
        create and start: they hold GPUs nobody uses), start the claims the engine could not restart
        before their claim volumes were mounted (a reboot), and unpin the claims that have no container."""
        with self._lock():
            for container_id, claim_id in self._docker.stale_created(max_created_age):
                log.warning("removing a container that never started claim=%s container=%s", claim_id, container_id[:12])
                self._docker.remove(container_id, grace_seconds=0)
            for container_id, claim_id in self._docker.waiting_for_volumes():
                log.warning("starting a claim the engine could not start before its volumes were mounted claim=%s container=%s",
                            claim_id, container_id[:12])
                try:
                    self._docker.start(container_id)
                except AgentError as error:
                    log.error("claim still not started claim=%s container=%s reason=%s", claim_id, container_id[:12], error.code)
            pinned = self._pins.claims()
            if pinned:
                live = {held.claim_id for held in self._docker.holders_of(VOLUMES_LABEL)}
                for claim_id in set(pinned) - live:
                    log.info("unpinning the volumes of a claim without a container claim=%s", claim_id)
                    self._pins.release(claim_id)

    @staticmethod
    def _check_ports(mappings: Iterable[PortMapping], holders: dict[tuple[int, str], str]) -> None:
        for mapping in mappings:
            holder = holders.get((mapping.host_port, mapping.protocol))
            if holder:
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is taken by container {holder[:12]}", host_port=mapping.host_port)
            if not port_is_free(mapping.host_port, mapping.protocol):
                raise PortTaken(f"host port {mapping.host_port}/{mapping.protocol} is in use on the node", host_port=mapping.host_port)

    def _with_gpus(
        self, spec: ContainerSpec, gpu_count: int, sample: GpuSample, holders: dict[str, str], preferred: Callable[[int], bool]
    ) -> ContainerSpec:
        """The closest free GPUs (see gpu_health: not lost, quarantined, held or dirty), among the
        `preferred` ones (with free cores near them) when enough are; quarantines are read here,
        under the lock, so one recorded before the lock is never missed."""
        if not sample.gpus:
            raise NoGpusFree(f"this node has no GPUs (GPU backend {self._inventory().backend})", requested=gpu_count, free_gpus=0)
        views = views_of(sample, self._gpus.facts(), holders, self._gpus.records.read())
        uuids = {view.status.index: view.status.uuid for view in views}
        free = sorted(view.status.index for view in views if view.state == "free")
        if len(free) < gpu_count:
            raise NoGpusFree(
                f"{gpu_count} GPUs requested, {len(free)} free of {len(views)}",
                requested=gpu_count,
                free_gpus=len(free),
            )
        near_free_cores = [i for i in free if preferred(i)]
        chosen = choose_gpus(near_free_cores if len(near_free_cores) >= gpu_count else free, gpu_count, self._inventory().distance)
        return replace(spec, gpu_ids=tuple(chosen), gpu_uuids=tuple(uuids[i] for i in chosen))

    @staticmethod
    def _resource_holders(cpu_holders: list[Holdings], memory_holders: list[Holdings]) -> list[Holdings]:
        """What every managed container with a CPU or memory limit holds, each container once."""
        by_id = {held.container_id: held for held in cpu_holders}
        by_id.update((held.container_id, held) for held in memory_holders)
        return list(by_id.values())

    def _has_free_cores(self, holders: list[Holdings]) -> Callable[[int], bool]:
        """Under exclusive pinning: whether a GPU still has a whole core near it that no claim holds."""
        if self._config.cpu_pinning != "exclusive":
            return lambda index: True
        free = set(self._node.cpus) - exclusive_cpus(holders) - reserved_cpu_ids(self._node, self._config.reserved_cpus)

        def near_free_core(index: int) -> bool:
            local = self._inventory().locality([index]).cpus
            return local is None or bool(local & free)

        return near_free_core

    def _with_resources(self, spec: ContainerSpec, node_gpus: int, holders: list[Holdings]) -> ContainerSpec:
        """CPUs, memory, shm and placement: a GPU claim's share where it asked for none, any other
        claim UTOPIA_AGENT_DEFAULT_CPUS and _MEMORY_MB (no claim runs unbounded), checked against
        what the other claims hold, and CPUs near its GPUs per UTOPIA_AGENT_CPU_PINNING."""
        config, node = self._config, self._node
        capacity = node.capacity(config.reserved_cpus, config.reserved_memory_mb)
        cpus, memory_mb = spec.cpus, spec.memory_mb
        if spec.gpu_ids:
            default_cpus, default_memory_mb = gpu_share(capacity, len(spec.gpu_ids), node_gpus)
        else:
            default_cpus, default_memory_mb = config.default_cpus, config.default_memory_mb
        cpus = default_cpus if cpus is None else cpus
        memory_mb = default_memory_mb if memory_mb is None else memory_mb
        locality = self._inventory().locality(spec.gpu_ids) if spec.gpu_ids else Locality()
        cpuset: tuple[int, ...] = ()
        memory_nodes: tuple[int, ...] = ()
        if config.cpu_pinning == "exclusive":
            reserved = reserved_cpu_ids(node, config.reserved_cpus)
            cpuset = choose_exclusive_cpus(node, math.ceil(cpus - 1e-9), locality.cpus, exclusive_cpus(holders), reserved)
            memory_nodes = numa_placement(node, None, locality.memory_nodes)[1]
            cpus = float(len(cpuset))
        elif config.cpu_pinning != "none" and spec.gpu_ids:
            cpuset, memory_nodes = numa_placement(node, locality.cpus, locality.memory_nodes)
        # A GPU claim's share is its own: only other GPU claims count against it, so claims without
        # GPUs never keep a GPU from being rented. A claim without GPUs fits into what no claim holds.
        counted = [held for held in holders if held.gpu_ids] if spec.gpu_ids else holders
        check_fits(cpus, memory_mb, capacity, sum(h.cpus for h in counted), sum(h.memory_mb for h in counted))
        return replace(
            spec,
            cpus=cpus,
            memory_mb=memory_mb,
            shm_size_mb=spec.shm_size_mb or default_shm_mb(memory_mb),
            cpuset=cpuset,
            memory_nodes=memory_nodes,
            cpu_pinning=config.cpu_pinning if cpuset else "",
        )

    def _with_disk(self, spec: ContainerSpec, node_gpus: int, holders: list[Holdings], disk_quota: str) -> ContainerSpec:
        """The container disk: as asked, else a GPU claim's share of the allocatable disk, else the
        node's default; checked against what every claim (and every other consumer) holds."""
        ledger = self.disk.ledger(holders)
        disk_gb = spec.disk_gb
        if disk_gb is None:
            disk_gb = disk_share(ledger.allocatable_gb, len(spec.gpu_ids), node_gpus) if spec.gpu_ids else self._config.default_disk_gb
        ledger.check_fits(disk_gb)
        return replace(spec, disk_gb=disk_gb, disk_quota=disk_quota)

    def disk_ledger(self) -> DiskLedger:
        """The node's disk straight from the engine (one list of the managed containers): what a
        decision takes under `allocation_lock`, such as a claim volume's size (see NodeDisk.add_consumer)."""
        return self.disk.ledger(carrying(self._docker.managed_rows(), MANAGED_LABEL))

    def _inventory(self) -> GpuInventory:
        """This worker's NVML inventory, which the sampler opens; GPU decisions only run once it has a sample."""
        return self._gpus.sampler.inventory or GpuInventory()
