"""The agent's answers as small frozen records, loaded through the server's own schemas."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from marshmallow import INCLUDE, Schema, ValidationError

from ..claims.records import PORTS_LABEL, PortMapping, parse_ports
from .errors import UnexpectedAnswer

# The records utopia_agent.client exports (make_record and load_answer are the client's own).
__all__ = [
    "Container",
    "ContainerGpuStats",
    "ContainerStats",
    "Created",
    "ExecResult",
    "Gpu",
    "GpuMetrics",
    "Health",
    "Image",
    "NodeMetrics",
    "PullProgress",
    "SystemMetrics",
    "Volume",
    "XidEvent",
]

R = TypeVar("R")


def make_record(cls: type[R], values: Mapping[str, Any]) -> R:
    """`cls` from the fields it knows; fields it lacks are left out, so a newer server's additions do no harm."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def load_answer(schema: Schema, data: Any, many: bool = False) -> Any:
    """Validate an answer with the server's schema; fields the schema does not know pass through."""
    try:
        return schema.load(data, unknown=INCLUDE, many=many)
    except ValidationError as error:
        raise UnexpectedAnswer(f"the answer does not fit {type(schema).__name__}: {error.messages}") from None


@dataclass(frozen=True)
class Container:
    """A managed container (GET /api/v1/containers[/<id>])."""

    id: str
    claim_id: str
    image: str
    status: str
    gpu_ids: list[int]
    ports: dict[str, str]
    created: int
    started: int
    labels: dict[str, str]
    exit_code: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    finished: int = 0
    error: str = ""
    resources: dict[str, Any] | None = None
    stopped: bool = False

    @property
    def port_mappings(self) -> frozenset[PortMapping]:
        """Every published port, from the `utopia.ports` label (`ports` keeps one host port per container port)."""
        return frozenset(parse_ports(self.labels.get(PORTS_LABEL, "")))


@dataclass(frozen=True)
class Volume:
    """A claim volume (GET /api/v1/volumes[/<name>]): `claims` mount it, running or stopped."""

    name: str
    size_gb: int
    used_mb: int | None
    created: int
    backend: str
    claims: list[str]
    ready: bool = True


@dataclass(frozen=True)
class Created:
    """POST /api/v1/containers: `existing` is true when the claim already had this very container."""

    container_id: str
    existing: bool = False


@dataclass(frozen=True)
class GpuMetrics:
    id: int
    temperature_c: int | None
    memory_total_mb: int | None
    memory_used_mb: int | None
    name: str | None
    uuid: str | None
    busy: bool
    usage_percent: float | None
    healthy: bool = True


@dataclass(frozen=True)
class SystemMetrics:
    cpu_usage_percent: float
    memory_usage_percent: float
    memory_total_mb: int
    memory_used_mb: int
    disk_usage_percent: float
    load_average: float
    uptime: int


@dataclass(frozen=True)
class NodeMetrics:
    """GET /api/v1/metrics."""

    node_id: str
    cpu_usage_percent: float
    memory_usage_percent: float
    gpus: list[GpuMetrics]
    system: SystemMetrics


@dataclass(frozen=True)
class Health:
    """GET /health, healthy (200) or not (503): `reason` says why not."""

    status: str
    timestamp: str
    reason: str | None = None
    draining: bool = False
    disk_pressure: bool = False

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


# The records below follow the contract's shapes for endpoints whose server schemas are not
# in this tree yet (issues 14 and 15); they are built field by field from the answer until
# those schemas land, and then loaded through them like the records above.


@dataclass(frozen=True)
class ContainerGpuStats:
    id: int
    uuid: str | None = None
    memory_used_mb: int | None = None
    usage_percent: float | None = None


@dataclass(frozen=True)
class ContainerStats:
    """GET /api/v1/containers/<id>/stats."""

    cpu_percent: float | None = None
    memory_used_mb: int | None = None
    memory_limit_mb: int | None = None
    gpus: list[ContainerGpuStats] = field(default_factory=list)
    disk_used_mb: int | None = None
    disk_limit_mb: int | None = None


@dataclass(frozen=True)
class ExecResult:
    """POST /api/v1/containers/<id>/exec: the command's end and its output (each stream bounded: `truncated`)."""

    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    timed_out: bool = False


@dataclass(frozen=True)
class XidEvent:
    time: Any = None
    code: int | None = None


@dataclass(frozen=True)
class Gpu:
    """One GPU of GET /api/v1/gpus: `state` is free, allocated, releasing, quarantined or lost."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    state: str = ""
    claim_id: str | None = None
    reason: str | None = None
    xid_events: list[XidEvent] = field(default_factory=list)


@dataclass(frozen=True)
class PullProgress:
    downloaded_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Image:
    """An image the node holds, or a pull in flight (GET /api/v1/images): `origin` is pulled,
    pulled_private or preloaded; `state` present, pulling or failed."""

    image: str
    id: str | None
    size_mb: float | None
    origin: str
    claims: list[str]
    last_used: int | None
    state: str
    progress: PullProgress | None = None
    error: str | None = None
