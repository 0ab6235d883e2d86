"""The agent's records of its containers, and the labels they are written to and read from.

Every container the agent creates carries labels from which the agent rebuilds all of its
state (the engine is the source of truth); this module writes and reads them. It imports no
`docker`: the HTTP client and the policy use it as well as the engine layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, UTC
from functools import cached_property
from typing import Any

from .resources import format_cpu_list, parse_cpu_list
from .volumes import Volume, decode_hosts, encode_hosts

# Every label the agent reads starts with this; an image may carry none of them (see allocation/policy.py).
LABEL_PREFIX = "utopia."
MANAGED_LABEL = "utopia.managed"
CLAIM_LABEL = "utopia.claim_id"
GPU_IDS_LABEL = "utopia.gpu_ids"
GPU_UUIDS_LABEL = "utopia.gpu_uuids"
PORTS_LABEL = "utopia.ports"
VOLUMES_LABEL = "utopia.volumes"
# The claim volumes it mounts: `ws-1:rw,data:ro` (volume names are claim-id-like: no ':' or ',').
CLAIM_VOLUMES_LABEL = "utopia.claim_volumes"
# What the container was given, as applied (see ContainerSpec.labels); a limit's label is left
# out when it has none, so the engine can list just the holders of CPUs or memory.
CPUS_LABEL = "utopia.cpus"
MEMORY_LABEL = "utopia.memory_mb"
SHM_LABEL = "utopia.shm_size_mb"
CPUSET_LABEL = "utopia.cpuset"
PINNING_LABEL = "utopia.cpu_pinning"
# The container disk's size in GB as applied, and how it is enforced (engine or measured; see disks/).
DISK_LABEL = "utopia.disk_gb"
DISK_QUOTA_LABEL = "utopia.disk_quota"
# A digest of the whole create request the container was made from (see allocation/policy.spec_digest).
SPEC_DIGEST_LABEL = "utopia.spec_digest"
MANAGED_FILTER = f"{MANAGED_LABEL}=true"
NAME_PREFIX = "utopia-"
# A claim stopped by the agent is renamed `utopia_stopped.<reason>.<restart policy>.<claim id>`:
# labels cannot change after create, and the name is the one thing of a container the agent may
# change that the engine keeps through its own restarts and the node's reboots, so Docker stays
# the only record of it. No claim's own name (`utopia-...`) can ever take that form.
STOPPED_NAME_PREFIX = "utopia_stopped."
STOP_REASON_PATTERN = r"^[a-z][a-z_]{0,39}$"
# A container in these states runs (or is about to), whatever its name says: it holds what it was given.
RUNNING_STATES = ("running", "restarting", "paused")
# The reason of a stop the API asked for; any other reason is the agent's own (an eviction).
REQUESTED_STOP = "requested"
# The NVIDIA runtime (often the engine's default) reads these from the container's environment,
# where the image's ENV stands unless the create call sets the name: every nvidia/cuda image says
# NVIDIA_VISIBLE_DEVICES=all. `void` makes the runtime act as plain runc: no GPU at all.
NO_GPUS_ENV = "NVIDIA_VISIBLE_DEVICES=void"
GPU_CAPABILITIES_ENV = "NVIDIA_DRIVER_CAPABILITIES=compute,utility"


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"

    @property
    def container_key(self) -> str:
        return f"{self.container_port}/{self.protocol}"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.container_key}"

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        """One entry of the `utopia.ports` label: `31001:8888/tcp`."""
        host, _, container = text.partition(":")
        port, _, protocol = container.partition("/")
        return cls(int(host), int(port), protocol or "tcp")


@dataclass(frozen=True)
class ClaimMount:
    """One claim volume mounted into a claim's container."""

    volume: str
    path: str
    read_only: bool = False

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


def parse_claim_volumes(label: str) -> tuple[tuple[str, bool], ...]:
    """(volume, read_only) for each entry of a `utopia.claim_volumes` label; mangled entries are skipped."""
    entries = []
    for part in _split(label):
        name, _, mode = part.rpartition(":")
        if name and mode in ("rw", "ro"):
            entries.append((name, mode == "ro"))
    return tuple(entries)


@dataclass(frozen=True)
class ContainerSpec:
    """What a claim asked for, after validation and node policy."""

    claim_id: str
    image: str
    gpu_ids: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    port_mappings: tuple[PortMapping, ...] = ()
    env_vars: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    working_dir: str = ""
    volumes: tuple[Volume, ...] = ()
    # Where the allocator pinned each volume (see volumes.MountPins): what the engine mounts.
    mount_sources: tuple[str, ...] = ()
    # Claim volumes, and the host path of each that the allocator found under the lock.
    mounts: tuple[ClaimMount, ...] = ()
    claim_mount_sources: tuple[str, ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None
    shm_size_mb: int | None = None
    restart_policy: str = "no"
    # CPUs and memory nodes the container is confined to (empty: anywhere), and why: numa or exclusive.
    cpuset: tuple[int, ...] = ()
    memory_nodes: tuple[int, ...] = ()
    cpu_pinning: str = ""
    # The node's InfiniBand character devices (host paths), passed through with IPC_LOCK and this memlock (-1: unlimited).
    infiniband_devices: tuple[str, ...] = ()
    memlock_bytes: int = -1
    # The container disk in GB, and how it is enforced: "engine" (storage_opt size), "measured" or "off".
    disk_gb: float | None = None
    disk_quota: str = ""
    spec_digest: str = ""

    @property
    def name(self) -> str:
        return container_name(self.claim_id)

    def environment(self) -> list[str]:
        """The caller's variables, then the agent's NVIDIA variables, which replace the image's:
        the container sees the GPUs it was given and no others."""
        if not self.gpu_uuids:
            return [*self.env_vars, NO_GPUS_ENV]
        return [*self.env_vars, "NVIDIA_VISIBLE_DEVICES=" + ",".join(self.gpu_uuids), GPU_CAPABILITIES_ENV]

    def labels(self) -> dict[str, str]:
        """The labels record what the container holds; a label is left out when it holds none,
        so the engine can list just the holders of GPUs or ports (`label=<key>` filters)."""
        labels = {MANAGED_LABEL: "true", CLAIM_LABEL: self.claim_id}
        if self.gpu_ids:
            labels[GPU_IDS_LABEL] = ",".join(str(i) for i in self.gpu_ids)
            labels[GPU_UUIDS_LABEL] = ",".join(self.gpu_uuids)
        if self.port_mappings:
            labels[PORTS_LABEL] = ",".join(str(m) for m in self.port_mappings)
        if self.volumes:
            labels[VOLUMES_LABEL] = encode_hosts(self.volumes)
        if self.mounts:
            labels[CLAIM_VOLUMES_LABEL] = ",".join(f"{mount.volume}:{mount.mode}" for mount in self.mounts)
        if self.cpus is not None:
            labels[CPUS_LABEL] = f"{self.cpus:g}"
        if self.memory_mb is not None:
            labels[MEMORY_LABEL] = str(self.memory_mb)
        if self.shm_size_mb is not None:
            labels[SHM_LABEL] = str(self.shm_size_mb)
        if self.cpuset:
            labels[CPUSET_LABEL] = format_cpu_list(self.cpuset)
            labels[PINNING_LABEL] = self.cpu_pinning
        if self.disk_gb is not None:
            labels[DISK_LABEL] = f"{self.disk_gb:.12g}"
            labels[DISK_QUOTA_LABEL] = self.disk_quota
        if self.spec_digest:
            labels[SPEC_DIGEST_LABEL] = self.spec_digest
        return labels


@dataclass(frozen=True)
class Holdings:
    """What a managed container holds, as its labels record it: the engine is the only record."""

    claim_id: str
    gpu_ids: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    port_mappings: tuple[PortMapping, ...]
    volume_hosts: tuple[str, ...] = ()
    cpus: float = 0.0
    memory_mb: int = 0
    exclusive_cpus: tuple[int, ...] = ()
    container_id: str = ""
    spec_digest: str = ""
    # Stopped by the agent (see StopMark): it keeps its volumes and its disk (the writable layer stays), and holds no GPU, port, CPU or memory.
    stopped: bool = False
    # The claim volumes it mounts, (name, read_only): held while the container exists, stopped or not.
    claim_volumes: tuple[tuple[str, bool], ...] = ()
    disk_gb: float = 0.0

    @classmethod
    def from_labels(cls, labels: dict[str, str], container_id: str = "", stopped: bool = False) -> Holdings:
        resources = resources_from_labels(labels)
        exclusive = labels.get(PINNING_LABEL) == "exclusive"
        volumes = tuple(decode_hosts(labels.get(VOLUMES_LABEL, "[]")))
        claim_id, digest = labels.get(CLAIM_LABEL, ""), labels.get(SPEC_DIGEST_LABEL, "")
        claim_volumes = parse_claim_volumes(labels.get(CLAIM_VOLUMES_LABEL, ""))
        if stopped:  # its writable layer stays: it keeps its disk
            return cls(claim_id, (), (), (), volumes, container_id=container_id, spec_digest=digest, stopped=True, claim_volumes=claim_volumes,
                       disk_gb=resources["disk_gb"] or 0.0)
        return cls(
            container_id=container_id,
            claim_id=claim_id,
            gpu_ids=_gpu_ids(labels),
            gpu_uuids=tuple(_split(labels.get(GPU_UUIDS_LABEL, ""))),
            port_mappings=_port_mappings(labels),
            volume_hosts=volumes,
            cpus=resources["cpus"] or 0.0,
            memory_mb=resources["memory_mb"] or 0,
            exclusive_cpus=_cpu_ids(labels.get(CPUSET_LABEL, "")) if exclusive else (),
            spec_digest=digest,
            claim_volumes=claim_volumes,
            disk_gb=resources["disk_gb"] or 0.0,
        )

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> Holdings:
        """What the container of one row of the engine's list holds (its labels, name and state)."""
        labels = row.get("Labels") or {}
        names = [name.lstrip("/") for name in row.get("Names") or ()]
        mark = next((m for name in names if (m := StopMark.parse(name, labels.get(CLAIM_LABEL, ""))) is not None), None)
        return cls.from_labels(labels, row["Id"], stopped=mark is not None and row.get("State") not in RUNNING_STATES)

    @classmethod
    def of_state(cls, state: ContainerState) -> Holdings:
        """What a container holds as the node view's record shows it: its labels, name and state, as `of_row`."""
        mark = StopMark.parse(state.name, state.labels.get(CLAIM_LABEL, ""))
        return cls.from_labels(state.labels, state.id, stopped=mark is not None and state.status not in RUNNING_STATES)


@dataclass(frozen=True)
class StopMark:
    """Why the agent stopped a claim's container, and the restart policy to give it back at start."""

    reason: str
    restart_policy: str

    def name(self, claim_id: str) -> str:
        return f"{STOPPED_NAME_PREFIX}{self.reason}.{self.restart_policy}.{claim_id}"

    @classmethod
    def parse(cls, name: str, claim_id: str) -> StopMark | None:
        """The mark a container's name carries, or None (any other name, or another claim's)."""
        if not name.startswith(STOPPED_NAME_PREFIX):
            return None
        reason, _, rest = name[len(STOPPED_NAME_PREFIX):].partition(".")
        policy, _, named_claim = rest.partition(".")
        if not reason or not policy or named_claim != claim_id or not claim_id:
            return None
        return cls(reason, policy)


def unix_seconds(stamp: str | None) -> int:
    """Engine timestamps are RFC 3339 with nanoseconds; the zero time means never."""
    if not stamp or stamp.startswith("0001-01-01"):
        return 0
    return int(datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC).timestamp())


def _endpoints(network_settings: dict | None) -> tuple[str, ...]:
    """The container's network endpoint ids: the engine makes new ones at every start, and its
    list call shows them, so a list can tell a container that restarted since it was inspected."""
    networks = (network_settings or {}).get("Networks") or {}
    return tuple(sorted(n["EndpointID"] for n in networks.values() if n and n.get("EndpointID")))


@dataclass(frozen=True)
class ContainerState:
    """A managed container as the engine's inspect last showed it (times in Unix seconds, 0 for never)."""

    id: str
    name: str
    image: str
    status: str
    created: int
    started: int
    finished: int
    exit_code: int
    oom_killed: bool
    restart_count: int
    error: str
    labels: dict[str, str]
    endpoints: tuple[str, ...] = ()

    @classmethod
    def from_inspect(cls, info: dict[str, Any]) -> ContainerState:
        state = info.get("State") or {}
        config = info.get("Config") or {}
        return cls(
            id=info["Id"],
            name=info.get("Name", "").lstrip("/"),
            image=config.get("Image", ""),
            status=state.get("Status", ""),
            created=unix_seconds(info.get("Created")),
            started=unix_seconds(state.get("StartedAt")),
            finished=unix_seconds(state.get("FinishedAt")),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            restart_count=int(info.get("RestartCount") or 0),
            error=state.get("Error") or "",
            labels=dict(config.get("Labels") or {}),
            endpoints=_endpoints(info.get("NetworkSettings")),
        )

    def agrees_with(self, row: dict[str, Any]) -> bool:
        """True when the engine's list row shows nothing this record lacks: same state, name and start."""
        names = [name.lstrip("/") for name in row.get("Names") or ()]
        return row.get("State") == self.status and self.name in names and _endpoints(row.get("NetworkSettings")) == self.endpoints

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerState:
        return cls(**{**data, "endpoints": tuple(data.get("endpoints") or ())})


@dataclass(frozen=True)
class ManagedContainer:
    """A container carrying `utopia.managed=true`, in the terms of the contract."""

    id: str
    claim_id: str
    image: str
    status: str
    gpu_ids: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    port_mappings: tuple[PortMapping, ...]
    created: int
    started: int
    labels: dict[str, str]
    # Everything the engine's inspect said (exit code, restart count, ...), beyond the contract.
    state: ContainerState | None = field(default=None, repr=False, compare=False)
    # Why the agent stopped it (`requested`, ...), while it is stopped; None otherwise.
    stop_reason: str | None = None

    @classmethod
    def from_state(cls, state: ContainerState) -> ManagedContainer:
        held = Holdings.from_labels(state.labels)
        mark = StopMark.parse(state.name, held.claim_id)
        return cls(
            id=state.id,
            claim_id=held.claim_id,
            image=state.image,
            status=state.status,
            gpu_ids=held.gpu_ids,
            gpu_uuids=held.gpu_uuids,
            port_mappings=held.port_mappings,
            created=state.created,
            started=state.started,
            labels=state.labels,
            state=state,
            stop_reason=mark.reason if mark is not None and state.status not in RUNNING_STATES else None,
        )

    @property
    def stopped(self) -> bool:
        """Stopped by the agent (by request, or evicted), apart from an exit: the engine never starts it on its own."""
        return self.stop_reason is not None

    @property
    def ports(self) -> dict[str, str]:
        ports: dict[str, str] = {}
        for mapping in self.port_mappings:
            ports.setdefault(mapping.container_key, str(mapping.host_port))
        return ports

    @property
    def resources(self) -> dict[str, Any]:
        return resources_from_labels(self.labels)

    @cached_property
    def holdings(self) -> Holdings:
        """What it holds, for the questions of claims/holders.py; read from the labels once."""
        return Holdings.from_labels(self.labels, self.id, stopped=self.stopped)

    def outcome(self) -> dict[str, Any]:
        """How the container last ended, from the node view's record of its inspect: no call per container."""
        state = self.state
        # A claim the agent stopped for a reason of its own (disk_limit_exceeded, ...) says so in `error`.
        evicted = self.stop_reason if self.stop_reason not in (None, REQUESTED_STOP) else None
        if state is None or not state.finished:
            return {"exit_code": None, "oom_killed": bool(state and state.oom_killed), "restart_count": state.restart_count if state else 0,
                    "finished": 0, "error": evicted or (state.error if state else "")}
        return {"exit_code": state.exit_code, "oom_killed": state.oom_killed, "restart_count": state.restart_count,
                "finished": state.finished, "error": evicted or state.error}


def resources_from_labels(labels: dict[str, str]) -> dict[str, Any]:
    """The container object's `resources`, from the labels written at create: no inspect per container.
    A label that is missing or mangled reads as null (no limit, or a container from before they were recorded)."""

    def number(key: str, kind):
        try:
            return kind(labels[key])
        except (KeyError, ValueError):
            return None

    cpuset = labels.get(CPUSET_LABEL) or None
    return {
        "cpus": number(CPUS_LABEL, float),
        "memory_mb": number(MEMORY_LABEL, int),
        "shm_size_mb": number(SHM_LABEL, int),
        "cpuset": cpuset if cpuset and _cpu_ids(cpuset) else None,
        "disk_gb": number(DISK_LABEL, float),
    }


def _cpu_ids(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError:
        return ()


def container_name(claim_id: str) -> str:
    """One name per claim, so the engine itself refuses a second container for it."""
    return NAME_PREFIX + claim_id


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _gpu_ids(labels: dict[str, str]) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split(labels.get(GPU_IDS_LABEL, "")))
    except ValueError:
        return ()


def parse_ports(label: str) -> tuple[PortMapping, ...]:
    """Every mapping of a `utopia.ports` label; ValueError for an entry that is not one."""
    return tuple(PortMapping.parse(part) for part in _split(label))


def _port_mappings(labels: dict[str, str]) -> tuple[PortMapping, ...]:
    try:
        return parse_ports(labels.get(PORTS_LABEL, ""))
    except ValueError:
        return ()
