"""Request and response schemas from the contract: validation and the OpenAPI document both come from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from marshmallow import Schema, ValidationError, fields, missing, validate, validates_schema
from marshmallow.utils import get_value

from .config import RESTART_POLICIES
from .errors import InvalidRequest, error_codes
from .claims.resources import MIN_MEMORY_MB

# Every pattern is anchored and means the same in Python and in the OpenAPI document's
# ECMA-262 dialect; `FullMatch` applies it to the whole value.
CLAIM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
ENV_ENTRY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*=[^\x00]*$"
CONTAINER_ID_PATTERN = r"^[0-9a-f]{12,64}$"
NO_NUL_PATTERN = r"^[^\x00]*$"
ABSOLUTE_PATH_PATTERN = r"^/[^\x00]*$"
REASON_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"
# The engine's reference grammar (distribution/reference), kept to what an orchestrator sends.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# As there, a first component is a registry only with a dot, a port, or as `localhost`;
# otherwise it is part of the (lowercase) repository path.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = rf"(?:(?:localhost|{_HOST_LABEL}(?:\.{_HOST_LABEL})+)(?::[0-9]{{1,5}})?/|{_HOST_LABEL}:[0-9]{{1,5}}/)"
IMAGE_PATTERN = rf"^{_REGISTRY}?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?$"

MAX_LIST_ITEMS = 256
MAX_STRING = 4096
NAME_MAX = 255  # bytes in one part of a path (a file or directory name)
MAXENV_ENTRY = 32 * 1024
MAX_VOLUMES = 32
MAX_CPUS = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024
# A petabyte: more than any node holds, small enough that a label keeps every digit.
MAX_DISK_GB = 1024 * 1024
MAX_LOG_TAIL = 10000
# An event stream asked to end (`?timeout=`) ends within the hour; a longer watch asks again from its last revision.
MAX_EVENTS_TIMEOUT_SECONDS = 3600


class StrictInteger(fields.Integer):
    """An integer that refuses booleans and floats, which JSON callers send by mistake."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictNumber(fields.Float):
    """A JSON number: refuses booleans and strings ("1.5"), which marshmallow would convert."""

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._validated(value)


class StringMap(fields.Dict):
    """String keys to string values (labels, ports); dumped as they are, since they are strings already."""

    def __init__(self, **kwargs):
        super().__init__(keys=fields.String(), values=fields.String(), **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else dict(value)


class FullMatch(validate.Regexp):
    """A Regexp over the whole value: Python's `$` also matches before a final newline, so
    `re.match` would let "claim\\n" through, where the engine (and JSON Schema) would not."""

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


NO_NUL = FullMatch(NO_NUL_PATTERN, error="must not contain NUL characters")
_ABSOLUTE_PATH = FullMatch(ABSOLUTE_PATH_PATTERN, error="must be an absolute path without NUL characters")


def names_fit(path: str) -> None:
    """Linux refuses a path with a part longer than NAME_MAX: say so here, not as the engine's 502."""
    if any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        raise ValidationError(f"each part of the path must be at most {NAME_MAX} bytes")


def _at_most_volumes(value: dict) -> None:
    """A count of entries; marshmallow's Length would be documented as a string's maxLength."""
    if len(value) > MAX_VOLUMES:
        raise ValidationError(f"at most {MAX_VOLUMES} volumes")


def _reader(source: str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A function that reads `source` (a dotted path of attributes or keys; None along it reads as None)."""
    if callable(source):
        return source
    path = source.split(".")

    def read(obj: Any) -> Any:
        for name in path:
            if obj is None:
                return None
            obj = obj.get(name, missing) if isinstance(obj, dict) else getattr(obj, name, missing)
        return obj

    return read


# The value classes a field of exactly these kinds dumps as they are (a subclass may format).
_KEPT_AS_IS = {fields.String: (str,), fields.Integer: (int,), fields.Float: (float,), fields.Boolean: (bool,)}


def _kept_as_is(field: fields.Field) -> frozenset[type]:
    return frozenset(() if getattr(field, "as_string", False) else _KEPT_AS_IS.get(type(field), ()))


def _formatter(field: fields.Field) -> Callable[[Any, str, Any], Any]:
    """How a value that is not None and not kept as is gets dumped: the field's own formatting,
    except that the items of a list are kept as they are where they can be."""
    if type(field) is not fields.List:
        return field._serialize
    keep, format_item = _kept_as_is(field.inner), _formatter(field.inner)
    return lambda value, name, obj: [item if item is None or item.__class__ in keep else format_item(item, name, obj) for item in value]


class ResponseSchema(Schema):
    """A response shape. `read_from` says where the dumped object keeps a field that it does not
    hold under the field's name: a dotted path (None along it reads as None) or a function of the
    object. Only dumping reads it, so loading (the client) keeps the wire names.

    Dumping follows a plan made once per instance: where each field is read, and the values it
    keeps as they are (a str for a String, ...). It answers what marshmallow's own dump answers
    (through `get_attribute`; tests/test_openapi_routes.py compares them) at a fraction of the
    cost, which counts on GET /api/v1/metrics, GET one container and /health."""

    read_from: ClassVar[dict[str, str | Callable[[Any], Any]]] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._plan = [
            (field.data_key or name, name, _reader(self.read_from[name]) if name in self.read_from else None,
             _kept_as_is(field), _formatter(field), field)
            for name, field in self.dump_fields.items()
        ]

    def get_attribute(self, obj: Any, attr: str, default: Any) -> Any:
        return _reader(self.read_from[attr])(obj) if attr in self.read_from else get_value(obj, attr, default)

    def _serialize(self, obj: Any, *, many: bool = False) -> Any:
        if many and obj is not None:
            return [self._serialize(each) for each in obj]
        from_dict = isinstance(obj, dict)
        dumped = {}
        for key, name, read, keep, format_value, field in self._plan:
            if read is not None:
                value = read(obj)
            else:
                value = obj.get(name, missing) if from_dict else getattr(obj, name, missing)
            if value is None or value.__class__ in keep:
                dumped[key] = value
                continue
            if value is missing:
                value = field.dump_default() if callable(field.dump_default) else field.dump_default
                if value is missing:
                    continue
            dumped[key] = format_value(value, name, obj)
        return dumped


class PortMappingSchema(Schema):
    host_port = StrictInteger(
        required=True,
        validate=validate.Range(1, 65535),
        metadata={"description": "Port on the node; must lie in UTOPIA_AGENT_HOST_PORT_RANGE and be free."},
    )
    container_port = StrictInteger(
        required=True, validate=validate.Range(1, 65535), metadata={"description": "Port inside the container."}
    )
    protocol = fields.String(
        load_default="tcp", validate=validate.OneOf(["tcp", "udp"]), metadata={"description": "`tcp` or `udp`."}
    )


class RegistryAuthSchema(Schema):
    """A create's credentials for its image's registry: sent to the engine for that pull or check
    only, never logged, stored or answered."""

    username = fields.String(required=True, validate=[validate.Length(min=1, max=MAX_STRING), NO_NUL],
                             metadata={"description": "The registry user."})
    password = fields.String(required=True, load_only=True, validate=[validate.Length(min=1, max=MAX_STRING), NO_NUL],
                             metadata={"description": "The user's password or a registry token.", "writeOnly": True})


# One `KEY=value` entry of an environment (a create's env_vars, an exec's env).
ENV_ENTRY = fields.String(validate=[
    validate.Length(max=MAXENV_ENTRY),
    FullMatch(ENV_ENTRY_PATTERN, error="must be KEY=VALUE with KEY made of letters, digits and _, not starting with a digit"),
])


class MountSchema(Schema):
    """One claim volume to mount (see POST /api/v1/volumes)."""

    volume = fields.String(required=True, validate=FullMatch(CLAIM_ID_PATTERN, error="is not a valid volume name"),
                           metadata={"description": "The claim volume's name."})
    path = fields.String(required=True, validate=[validate.Length(min=1, max=MAX_STRING), _ABSOLUTE_PATH, names_fit],
                         metadata={"description": "Where the container sees it (absolute)."})
    read_only = fields.Boolean(load_default=False, metadata={"description": "Read-only mounts may be shared; a read-write one is the claim's alone."})


class CreateContainerSchema(Schema):
    """POST /api/v1/containers body; unknown fields are refused (marshmallow's default)."""

    claim_id = fields.String(
        required=True,
        validate=FullMatch(CLAIM_ID_PATTERN, error="must be 1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        metadata={"description": "The claim this container serves; one live container per claim."},
    )
    image = fields.String(
        required=True,
        validate=[validate.Length(max=512), FullMatch(IMAGE_PATTERN, error="is not a valid image reference")],
        metadata={"description": "Image reference; pulled when the engine does not have it."},
    )
    gpu_count = StrictInteger(
        load_default=0,
        validate=validate.Range(0, 64),
        metadata={"description": "GPUs given to the container exclusively, chosen by the agent."},
    )
    port_mappings = fields.List(
        fields.Nested(PortMappingSchema),
        load_default=list,
        validate=validate.Length(max=64),
        metadata={"description": "Host ports published to container ports."},
    )
    env_vars = fields.List(
        ENV_ENTRY,
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
        metadata={"description": "Environment entries `KEY=value`; GPU-selecting names (NVIDIA_*, CUDA_VISIBLE_DEVICES, ...) are refused."},
    )
    command = fields.List(
        fields.String(validate=[validate.Length(max=MAX_STRING), NO_NUL]),
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
        metadata={"description": "Command and arguments; empty runs the image's own command."},
    )
    working_dir = fields.String(
        load_default="",
        validate=[
            validate.Length(max=MAX_STRING),
            FullMatch(r"^(/[^\x00]*)?$", error="must be empty or an absolute path without NUL characters"),
            names_fit,
        ],
        metadata={"description": "Absolute working directory in the container; empty keeps the image's."},
    )
    volumes = fields.Dict(
        keys=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _ABSOLUTE_PATH, names_fit]),
        values=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _ABSOLUTE_PATH, names_fit]),
        load_default=dict,
        validate=_at_most_volumes,
        metadata={
            "description": "Host path -> container path; the host path must lie under UTOPIA_AGENT_VOLUME_ROOTS.",
            "maxProperties": MAX_VOLUMES,
        },
    )
    mounts = fields.List(
        fields.Nested(MountSchema),
        load_default=list,
        validate=validate.Length(max=MAX_VOLUMES),
        metadata={"description": "Claim volumes to mount: an unknown one is 404 with nothing made; one mounted read-write by "
                                 "another claim (or read-write here while another mounts it) is 409 volume_in_use."},
    )
    cpus = StrictNumber(
        validate=validate.Range(0.01, MAX_CPUS),
        metadata={"description": "CPU cores the container may use. Default: a GPU claim gets its share of the node, any other claim no limit."},
    )
    memory_mb = StrictInteger(
        validate=validate.Range(MIN_MEMORY_MB, MAX_MEMORY_MB),
        metadata={"description": "Memory limit in MiB; going over it kills the job. "
                                 "Default: a GPU claim gets its share of the node, any other claim no limit."},
    )
    shm_size_mb = StrictInteger(
        validate=validate.Range(1, MAX_MEMORY_MB),
        metadata={"description": "Size of /dev/shm in MiB. Default: half of memory_mb, else the node's default."},
    )
    disk_gb = StrictNumber(
        validate=validate.Range(0, MAX_DISK_GB, min_inclusive=False),
        metadata={"description": "The container disk in GB (2^30 bytes): what it may write outside its volumes. "
                                 "Default: a GPU claim gets its share of the node's allocatable disk, any other claim the node's default."},
    )
    restart_policy = fields.String(
        validate=validate.OneOf(RESTART_POLICIES),
        metadata={"description": "What the engine does when the job exits. Default: the node's."},
    )
    registry_auth = fields.Nested(
        RegistryAuthSchema,
        metadata={"description": "Credentials for the image's registry. An image pulled with them is private on this node: "
                                 "a later create naming it must give credentials its registry accepts."},
    )

    @validates_schema
    def _unique_ports(self, data, **kwargs):
        seen: set[tuple[int, str]] = set()
        for mapping in data.get("port_mappings", []):
            key = (mapping["host_port"], mapping["protocol"])
            if key in seen:
                raise ValidationError(f"host port {key[0]}/{key[1]} appears twice", "port_mappings")
            seen.add(key)


class ListContainersQuerySchema(Schema):
    """GET /api/v1/containers query; unknown parameters are refused, as unknown body fields are."""

    claim_id = fields.String(
        validate=FullMatch(CLAIM_ID_PATTERN, error="is not a valid claim id"),
        metadata={"description": "Only the container of this claim."},
    )


class EventsQuerySchema(Schema):
    """GET /api/v1/events query; unknown parameters are refused."""

    since = fields.Integer(
        strict=False, validate=validate.Range(0), metadata={"description": "Send every change after this revision first (a list's X-Utopia-Revision)."}
    )
    timeout = fields.Integer(
        strict=False,
        validate=validate.Range(1, MAX_EVENTS_TIMEOUT_SECONDS),
        metadata={"description": f"End the stream after this many seconds (1 to {MAX_EVENTS_TIMEOUT_SECONDS}), with a last heartbeat "
                                 "carrying the revision to resume from (as Kubernetes' watch takes `timeoutSeconds`). "
                                 "Without it the stream lasts until the client goes."},
    )


class ContainerPathSchema(Schema):
    """The path of the routes of one container; documents it only: an id that does not fit is
    simply unknown (404), as the contract has it."""

    container_id = fields.String(
        metadata={"description": "The full container id or a unique prefix of at least 12 hex digits.", "pattern": CONTAINER_ID_PATTERN}
    )


class GpuPathSchema(Schema):
    """The path of the routes of one GPU; an unknown UUID is a 404."""

    uuid = fields.String(metadata={"description": "The GPU's UUID, as NVML reports it (GPU-...)."})


class CreatedSchema(ResponseSchema):
    container_id = fields.String(required=True, metadata={"description": "The full (64 hex digit) id of the new container."})


# One container as GET answers it: host ports are strings (as the engine gives them) and
# times are Unix seconds.
CONTAINER_EXAMPLE = {
    "id": "4f1c9a2be07d5c3a8e6b1f0d2c4a6e8b0d1f3a5c7e9b2d4f6a8c0e1b3d5f7a9c",
    "claim_id": "claim-42",
    "image": "registry.example.com/team/train:1.4",
    "status": "running",
    "gpu_ids": [0, 1],
    "ports": {"8888/tcp": "31001"},
    "created": 1764000000,
    "started": 1764000001,
    "resources": {"cpus": 12.0, "memory_mb": 245760, "shm_size_mb": 122880, "cpuset": "0-11", "disk_gb": 400.0},
    "exit_code": None,
    "oom_killed": False,
    "restart_count": 0,
    "finished": 0,
    "error": "",
    "stopped": False,
    "labels": {
        "utopia.managed": "true",
        "utopia.claim_id": "claim-42",
        "utopia.gpu_ids": "0,1",
        "utopia.gpu_uuids": "GPU-5b0c8a1e-0000-0000-0000-000000000000,GPU-5b0c8a1e-0000-0000-0000-000000000001",
        "utopia.ports": "31001:8888/tcp",
    },
}


class ResourcesSchema(ResponseSchema):
    """What the container got, as applied; null where it has no limit (or predates the agent recording it)."""

    cpus = fields.Float(allow_none=True, required=True, metadata={"description": "CPU cores it may use; null without a limit."})
    memory_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Memory limit in MiB; null without a limit."})
    shm_size_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Size of its /dev/shm in MiB."})
    cpuset = fields.String(allow_none=True, required=True, metadata={"description": "The CPUs it is pinned to, as a Linux CPU list; null when not pinned."})
    disk_gb = fields.Float(allow_none=True, required=True,
                           metadata={"description": "Its container disk in GB; null for a container made before the agent sized disks."})


def _outcome(name: str) -> Callable[[Any], Any]:
    return lambda container: container.outcome()[name]


class ContainerSchema(ResponseSchema):
    read_from = {name: _outcome(name) for name in ("exit_code", "oom_killed", "restart_count", "finished", "error")}

    id = fields.String(required=True, metadata={"description": "The full Docker container id (64 hex digits)."})
    claim_id = fields.String(required=True, metadata={"description": "The claim this container serves."})
    image = fields.String(required=True, metadata={"description": "The image reference it was created from."})
    status = fields.String(
        required=True,
        metadata={
            "description": "The engine's state of the container.",
            "enum": ["created", "running", "paused", "restarting", "removing", "exited", "dead"],
        },
    )
    gpu_ids = fields.List(
        fields.Integer(), required=True, metadata={"description": "NVML indices of the GPUs given to it; empty for none."}
    )
    ports = StringMap(required=True, metadata={"description": "`<container_port>/<protocol>` -> the host port, as a string."})
    created = fields.Integer(required=True, metadata={"description": "When it was created, in Unix seconds."})
    started = fields.Integer(
        required=True, metadata={"description": "When it last started, in Unix seconds; 0 if it never started."}
    )
    labels = StringMap(
        required=True, metadata={"description": "Its labels: `utopia.managed`, `utopia.claim_id`, and the GPUs and ports it holds."}
    )
    resources = fields.Nested(ResourcesSchema, required=True, metadata={"description": "CPUs, memory, shm and cpuset as applied."})
    exit_code = fields.Integer(allow_none=True, required=True, metadata={"description": "Exit code of its last run; null until it first exits."})
    oom_killed = fields.Boolean(required=True, metadata={"description": "True when its last run was killed for going over its memory limit."})
    restart_count = fields.Integer(required=True, metadata={"description": "How many times the engine restarted it (its restart policy)."})
    finished = fields.Integer(required=True, metadata={"description": "When its last run ended, in Unix seconds; 0 until it first exits."})
    error = fields.String(required=True, metadata={"description": "The engine's error text for its last start, or \"\"; for a claim "
                                                                   "the agent stopped on its own, why (`disk_limit_exceeded`, ...)."})
    stopped = fields.Boolean(required=True, metadata={"description": "Stopped by the agent (POST .../stop, or evicted), apart from an exit: "
                                                                     "it holds no GPU, port or CPU, and the engine never starts it on its own."})


class LogsQuerySchema(Schema):
    """GET /api/v1/containers/<id>/logs; unknown parameters are refused."""

    tail = fields.Integer(load_default=100, validate=validate.Range(0, MAX_LOG_TAIL), metadata={"description": "The last N lines."})
    since = fields.Float(validate=validate.Range(0, 1e11), metadata={"description": "Only lines logged at or after this Unix time (seconds)."})
    timestamps = fields.Boolean(load_default=False, metadata={"description": "Prefix each line with its RFC 3339 time."})
    follow = fields.Boolean(load_default=False, metadata={"description": "Keep streaming new lines, for at most the node's follow limit."})


class ContainerGpuStatsSchema(ResponseSchema):
    read_from = {"id": "index"}

    id = fields.Integer(required=True, metadata={"description": "NVML index of one of the container's GPUs."})
    uuid = fields.String(allow_none=True, required=True, metadata={"description": "GPU UUID; null when unreadable."})
    memory_used_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Used GPU memory in MiB; null when unreadable."})
    usage_percent = fields.Float(allow_none=True, required=True, metadata={"description": "GPU utilisation in percent; null when unreadable."})


class ContainerStatsSchema(ResponseSchema):
    cpu_percent = fields.Float(required=True, metadata={"description": "Busy share of one CPU (200 is two CPUs busy) over the last few seconds."})
    memory_used_mb = fields.Integer(required=True, metadata={"description": "Memory in use, without reclaimable page cache."})
    memory_limit_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "null when the container has no memory limit."})
    gpus = fields.List(fields.Nested(ContainerGpuStatsSchema), required=True, metadata={"description": "The figures of the container's own GPUs."})
    disk_used_mb = fields.Integer(allow_none=True, required=True,
                                  metadata={"description": "What its writable layer takes on disk, in MiB, as last measured (the node measures "
                                                           "running claims in the background); null before the first measurement."})
    disk_limit_mb = fields.Integer(allow_none=True, required=True,
                                   metadata={"description": "Its container disk in MiB (`disk_gb`); null for a container made before disks were sized."})


class ReasonSchema(Schema):
    """The body of POST /api/v1/gpus/<uuid>/quarantine and POST /api/v1/node/drain."""

    reason = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=512), FullMatch(REASON_PATTERN, error="must say something, without NUL characters")],
        metadata={"description": "Why, for the operator who reads it later (kept with the record)."},
    )


GPU_STATES = ["free", "allocated", "releasing", "quarantined", "lost"]


class XidEventSchema(ResponseSchema):
    time = fields.Integer(required=True, metadata={"description": "Unix seconds when the agent received it."})
    code = fields.Integer(required=True, metadata={"description": "The Xid."})


class GpuSchema(ResponseSchema):
    """One GPU of GET /api/v1/gpus, dumped from a gpu_health.GpuView."""

    read_from = {
        "index": "status.index",
        "uuid": "status.uuid",
        "name": "status.name",
        "pci_bus_id": "facts.pci_bus_id",
        "numa_node": "facts.numa_node",
    }

    index = fields.Integer(required=True, metadata={"description": "NVML index."})
    uuid = fields.String(allow_none=True, required=True, metadata={"description": "GPU UUID; null when unreadable."})
    name = fields.String(allow_none=True, required=True, metadata={"description": "Product name; null when unreadable."})
    pci_bus_id = fields.String(allow_none=True, required=True, metadata={"description": "PCI bus id; null when unreadable."})
    numa_node = fields.Integer(allow_none=True, required=True, metadata={"description": "The NUMA node it sits on; null when NVML cannot say."})
    state = fields.String(required=True, metadata={"enum": GPU_STATES, "description": "Only a free GPU is given to a claim."})
    claim_id = fields.String(allow_none=True, required=True, metadata={"description": "The claim whose container holds it."})
    reason = fields.String(allow_none=True, required=True, metadata={"description": "Why it is quarantined, releasing or lost."})
    xid_events = fields.List(fields.Nested(XidEventSchema), required=True, metadata={"description": "Its recent Xids, oldest first."})


class DrainSchema(ResponseSchema):
    draining = fields.Boolean(required=True, metadata={"description": "True while the node takes no new claims."})
    reason = fields.String(allow_none=True, required=True, metadata={"description": "The operator's reason; null when not draining."})
    since = fields.Integer(allow_none=True, required=True, metadata={"description": "Unix seconds."})


class NodeGpuSchema(ResponseSchema):
    index = fields.Integer(required=True, metadata={"description": "NVML index."})
    uuid = fields.String(allow_none=True, required=True, metadata={"description": "GPU UUID; null when unreadable."})
    name = fields.String(allow_none=True, required=True, metadata={"description": "Product name; null when unreadable."})
    pci_bus_id = fields.String(allow_none=True, required=True, metadata={"description": "PCI bus id; null when unreadable."})
    numa_node = fields.Integer(allow_none=True, required=True, metadata={"description": "The NUMA node it sits on; null when NVML cannot say."})
    compute_capability = fields.String(allow_none=True, required=True, metadata={"description": "CUDA compute capability, e.g. 9.0."})


class NumaNodeSchema(ResponseSchema):
    id = fields.Integer(required=True, metadata={"description": "NUMA node id."})
    cpus = fields.List(fields.Integer(), required=True, metadata={"description": "Its CPUs."})
    memory_total_mb = fields.Integer(allow_none=True, required=True, metadata={"description": "Its memory in MiB; null when unknown."})


class NetworkSchema(ResponseSchema):
    """The claims' network and its isolation (see the contract's "Tenant networks")."""

    isolation = fields.String(required=True, metadata={"enum": ["on", "off"], "description": "UTOPIA_AGENT_NETWORK_ISOLATION."})
    name = fields.String(load_default=None, metadata={"description": "The engine network claims join; absent when isolation is off."})
    bridge = fields.String(load_default=None, metadata={"description": "Its bridge interface, which the agent's firewall rules match."})
    subnet = fields.String(allow_none=True, load_default=None, metadata={"description": "Its IPv4 subnet; null until the network is made."})
    gateway = fields.String(allow_none=True, load_default=None, metadata={"description": "The bridge's address; null until the network is made."})
    blocked_networks = fields.List(fields.String(), load_default=list,
                                   metadata={"description": "Destinations claims may not reach besides the node: 169.254.0.0/16, the "
                                                            "clouds' metadata endpoints (less UTOPIA_AGENT_UNBLOCKED_NETWORKS) and "
                                                            "UTOPIA_AGENT_BLOCKED_NETWORKS."})
    resolvers = fields.List(fields.String(), load_default=list,
                            metadata={"description": "The node's DNS resolvers (as the engine gives them to containers): claims "
                                                     "reach them on port 53, UDP and TCP, and nothing else there."})
    rules_in_place = fields.Boolean(load_default=None, metadata={"description": "True while the agent's firewall rules stand as it put them."})
    problem = fields.String(allow_none=True, load_default=None,
                            metadata={"description": "Why claims cannot run protected now (creates and /health answer 503); null when they can."})
    unprotected_claims = fields.List(fields.String(), load_default=list,
                                     metadata={"description": "Claims on the engine's default bridge, made before isolation was on: not isolated."})


class NodeDiskSchema(ResponseSchema):
    """The claims' disk (see the contract's "Disks")."""

    quota = fields.String(required=True, metadata={"enum": ["engine", "measured", "off"],
                                                   "description": "How container disks are enforced: by the engine's storage driver, "
                                                                  "by the agent measuring, or not at all."})
    allocatable_gb = fields.Float(required=True, metadata={"description": "The engine's data-root filesystem less UTOPIA_AGENT_RESERVED_DISK_GB."})
    allocated_gb = fields.Float(required=True, metadata={"description": "What the claims' container disks (and claim volumes) hold of it."})
    free_gb = fields.Float(required=True, metadata={"description": "What a create may still have."})
    pressure = fields.Boolean(required=True, metadata={"description": "True while the data root's or the state dir's filesystem is short of "
                                                                      "free space (creates answer 507)."})


class NodeSchema(ResponseSchema):
    """GET /api/v1/node."""

    read_from = {name: f"driver.{name}" for name in ("driver_version", "cuda_driver_version", "nvml_version")}

    agent_version = fields.String(required=True, metadata={"description": "The agent's version."})
    node_id = fields.String(required=True, metadata={"description": "UTOPIA_AGENT_NODE_ID, by default the hostname."})
    gpu_backend = fields.String(required=True, metadata={"enum": ["nvml", "fake", "none", "auto"], "description": "auto only while NVML is still opening."})
    driver_version = fields.String(allow_none=True, required=True, metadata={"description": "The NVIDIA driver's version; null without NVML."})
    cuda_driver_version = fields.String(allow_none=True, required=True, metadata={"description": "The NVIDIA driver's version; null without NVML."})
    nvml_version = fields.String(allow_none=True, required=True, metadata={"description": "NVML's version; null without NVML."})
    nvml_hung = fields.String(allow_none=True, required=True, metadata={"description": "Why NVML counts as hung, or null."})
    engine_version = fields.String(allow_none=True, required=True, metadata={"description": "Null while the engine does not answer."})
    cpu_count = fields.Integer(required=True, metadata={"description": "CPUs the node has."})
    memory_total_mb = fields.Integer(required=True, metadata={"description": "Memory in MiB."})
    numa_nodes = fields.List(fields.Nested(NumaNodeSchema), required=True, metadata={"description": "The NUMA nodes with their CPUs."})
    gpus = fields.List(fields.Nested(NodeGpuSchema), required=True, metadata={"description": "Every GPU, in index order."})
    topology = fields.List(
        fields.List(fields.String(allow_none=True)),
        required=True,
        metadata={"description": "GPU by GPU in index order, as `nvidia-smi topo -m` names the link: "
                                 "X, NV<links>, PIX, PXB, PHB, NODE, SYS, BOARD; null where NVML cannot say."},
    )
    drain = fields.Nested(DrainSchema, required=True, metadata={"description": "Whether the node takes claims."})
    network = fields.Nested(NetworkSchema, required=True, metadata={"description": "The claims' network and whether its isolation is in place."})
    claim_volume_backend = fields.String(required=True, metadata={"enum": ["loop", "btrfs"], "description": "How new claim volumes get "
                                                                   "their size: a loop-mounted ext4 file, or a btrfs subvolume under a qgroup limit."})
    disk = fields.Nested(NodeDiskSchema, allow_none=True, required=True,
                         metadata={"description": "The claims' disk; null while the engine does not say where its data root is."})


class HealthSchema(ResponseSchema):
    status = fields.String(
        required=True, validate=validate.OneOf(["healthy", "unhealthy"]),
            metadata={"description": "`unhealthy` while the engine does not answer or NVML is hung."}
    )
    timestamp = fields.String(required=True, metadata={"description": "When it was answered, ISO 8601 in UTC."})
    draining = fields.Boolean(required=True, metadata={"description": "The node takes no new claims; it stays healthy."})
    disk_pressure = fields.Boolean(
        required=True,
        metadata={"description": "The engine's data root or the state dir has less free space than UTOPIA_AGENT_DISK_PRESSURE_PERCENT: "
                                 "creates answer 507; the node stays healthy."},
    )
    reason = fields.String(metadata={"description": "Why it is unhealthy."})

    # Absent, not null, while healthy.
    read_from = {"reason": lambda health: health.reason or missing}


class ErrorSchema(Schema):
    error = fields.String(
        required=True,
        validate=validate.OneOf(error_codes()),
        metadata={"description": "A stable machine-readable code; each operation's responses say which it may answer."},
    )
    message = fields.String(required=True, metadata={"description": "What went wrong, for a human."})
    errors = fields.Dict(metadata={"description": "Per-field (or per-parameter) messages, for 400 and 403."})
    claim_id = fields.String(metadata={"description": "The claim, for 409 claim_exists; the claim holding what was asked for, for 409 "
                                                      "gpu_held, and for the 409s of a start (no_gpus_free, not_enough_resources)."})
    container_id = fields.String(
        allow_none=True,
        metadata={"description": "The existing container, for 409 claim_exists (null when it went away meanwhile)."},
    )
    same_spec = fields.Boolean(
        metadata={"description": "For 409 claim_exists: whether the existing container was made from this very request (its spec digest)."}
    )
    revision = fields.Integer(metadata={"description": "The node's last revision, for 410 revision_too_old."})
    requested = fields.Integer(metadata={"description": "How many GPUs were asked for, for 409 no_gpus_free."})
    free_gpus = fields.Integer(metadata={"description": "How many GPUs are free, for 409 no_gpus_free."})
    host_port = fields.Integer(metadata={"description": "The host port that is taken, for 409 port_taken."})
    free_cpus = fields.Float(metadata={"description": "CPUs free for claims, for 409 not_enough_resources."})
    free_memory_mb = fields.Integer(metadata={"description": "Memory free for claims, for 409 not_enough_resources."})
    free_cpuset = fields.String(metadata={"description": "Whole cores free near the GPUs, for 409 not_enough_resources under exclusive pinning."})
    free_disk_gb = fields.Float(metadata={"description": "Disk free for claims in GB, for 409 not_enough_resources."})
    image = fields.String(metadata={"description": "The image that could not be pulled, for 502 image_pull_failed."})
    volume = fields.String(metadata={"description": "The claim volume, for volume_not_found, volume_exists and volume_in_use."})
    reason = fields.String(metadata={"description": "The operator's reason, for 409 node_draining."})
    max_body_bytes = fields.Integer(metadata={"description": "The node's UTOPIA_AGENT_MAX_BODY_BYTES, for 413 body_too_large."})
    filesystem = fields.String(
        metadata={"description": "A directory on the filesystem short of room, for 507 insufficient_storage: the agent's state dir, or the "
                                 "engine's data root under disk pressure."}
    )


def load_request(schema: Schema, payload) -> dict:
    """Validate a JSON body with `schema`, raising InvalidRequest with per-field messages."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"_schema": ["expected a JSON object"]})
    try:
        return schema.load(payload)
    except ValidationError as exc:
        raise InvalidRequest("the request body is invalid", errors=exc.messages) from None


def load_query(schema: Schema, args) -> dict:
    """Validate a query string (a MultiDict) with `schema`; an unknown or repeated parameter is a 400 naming it
    (a list field's parameter is repeated, once per item)."""
    repeatable = {name for name, field in schema.fields.items() if isinstance(field, fields.List)}
    errors: dict[str, list[str]] = {name: ["given more than once"] for name in args if name not in repeatable and len(args.getlist(name)) > 1}
    given = {name: args.getlist(name) if name in repeatable else args.get(name) for name in args}
    try:
        data = schema.load(given)
    except ValidationError as exc:
        errors = {**exc.messages, **errors}
    if not errors:
        return data
    unknown = sorted(name for name in errors if name not in schema.fields)
    if unknown:
        known = ", ".join(sorted(schema.fields)) or "none"
        message = f"unknown query parameter {', '.join(unknown)} (this route takes: {known})"
    else:
        message = "the query is invalid: " + "; ".join(f"{name} {' '.join(errors[name])}" for name in sorted(errors))
    raise InvalidRequest(message, errors=errors)
