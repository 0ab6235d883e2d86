"""Request and response schemas from the contract: validation and the OpenAPI document both come from here."""

from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from .errors import InvalidRequest

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
MAX_ENV_ENTRY = 32 * 1024
MAX_VOLUMES = 32


class StrictInteger(fields.Integer):
    """An integer that refuses booleans and floats, which JSON callers send by mistake."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class FullMatch(validate.Regexp):
    """A Regexp over the whole value: Python's `$` also matches before a final newline, so
    `re.match` would let "claim\\n" through, where the engine (and JSON Schema) would not."""

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


_NO_NUL = FullMatch(NO_NUL_PATTERN, error="must not contain NUL characters")
_ABSOLUTE_PATH = FullMatch(ABSOLUTE_PATH_PATTERN, error="must be an absolute path without NUL characters")


def _at_most_volumes(value: dict) -> None:
    """A count of entries; marshmallow's Length would be documented as a string's maxLength."""
    if len(value) > MAX_VOLUMES:
        raise ValidationError(f"at most {MAX_VOLUMES} volumes")


class PortMappingSchema(Schema):
    host_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    container_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    protocol = fields.String(load_default="tcp", validate=validate.OneOf(["tcp", "udp"]))


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
    )
    gpu_count = StrictInteger(load_default=0, validate=validate.Range(0, 64))
    port_mappings = fields.List(fields.Nested(PortMappingSchema), load_default=list, validate=validate.Length(max=64))
    env_vars = fields.List(
        fields.String(
            validate=[
                validate.Length(max=MAX_ENV_ENTRY),
                FullMatch(ENV_ENTRY_PATTERN, error="must be KEY=VALUE with KEY made of letters, digits and _, not starting with a digit"),
            ]
        ),
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
    )
    command = fields.List(
        fields.String(validate=[validate.Length(max=MAX_STRING), _NO_NUL]),
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
    )
    working_dir = fields.String(
        load_default="",
        validate=[validate.Length(max=MAX_STRING), FullMatch(r"^(/[^\x00]*)?$", error="must be empty or an absolute path without NUL characters")],
    )
    volumes = fields.Dict(
        keys=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _ABSOLUTE_PATH]),
        values=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _ABSOLUTE_PATH]),
        load_default=dict,
        validate=_at_most_volumes,
        metadata={"description": "Host path -> container path.", "maxProperties": MAX_VOLUMES},
    )

    @validates_schema
    def _unique_ports(self, data, **kwargs):
        seen: set[tuple[int, str]] = set()
        for mapping in data.get("port_mappings", []):
            key = (mapping["host_port"], mapping["protocol"])
            if key in seen:
                raise ValidationError(f"host port {key[0]}/{key[1]} appears twice", "port_mappings")
            seen.add(key)


class CreatedSchema(Schema):
    container_id = fields.String(required=True)


class ContainerSchema(Schema):
    id = fields.String(required=True)
    claim_id = fields.String(required=True)
    image = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": ["created", "running", "paused", "restarting", "removing", "exited", "dead"]})
    gpu_ids = fields.List(fields.Integer(), required=True)
    ports = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    created = fields.Integer(required=True)
    started = fields.Integer(required=True)
    labels = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class ReasonSchema(Schema):
    """The body of POST /api/v1/gpus/<uuid>/quarantine and POST /api/v1/node/drain."""

    reason = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=512), FullMatch(REASON_PATTERN, error="must say something, without NUL characters")],
        metadata={"description": "Why, for the operator who reads it later (kept with the record)."},
    )


GPU_STATES = ["free", "allocated", "releasing", "quarantined", "lost"]


class XidEventSchema(Schema):
    time = fields.Integer(required=True, metadata={"description": "Unix seconds when the agent received it."})
    code = fields.Integer(required=True, metadata={"description": "The Xid."})


class GpuSchema(Schema):
    """One GPU of GET /api/v1/gpus."""

    index = fields.Integer(required=True, metadata={"description": "NVML index."})
    uuid = fields.String(allow_none=True, required=True)
    name = fields.String(allow_none=True, required=True)
    pci_bus_id = fields.String(allow_none=True, required=True)
    numa_node = fields.Integer(allow_none=True, required=True)
    state = fields.String(required=True, metadata={"enum": GPU_STATES, "description": "Only a free GPU is given to a claim."})
    claim_id = fields.String(allow_none=True, required=True, metadata={"description": "The claim whose container holds it."})
    reason = fields.String(allow_none=True, required=True, metadata={"description": "Why it is quarantined, releasing or lost."})
    xid_events = fields.List(fields.Nested(XidEventSchema), required=True, metadata={"description": "Its recent Xids, oldest first."})


class DrainSchema(Schema):
    draining = fields.Boolean(required=True)
    reason = fields.String(allow_none=True, required=True)
    since = fields.Integer(allow_none=True, required=True, metadata={"description": "Unix seconds."})


class NodeGpuSchema(Schema):
    index = fields.Integer(required=True)
    uuid = fields.String(allow_none=True, required=True)
    name = fields.String(allow_none=True, required=True)
    pci_bus_id = fields.String(allow_none=True, required=True)
    numa_node = fields.Integer(allow_none=True, required=True)
    compute_capability = fields.String(allow_none=True, required=True, metadata={"description": "CUDA compute capability, e.g. 9.0."})


class NumaNodeSchema(Schema):
    id = fields.Integer(required=True)
    cpus = fields.List(fields.Integer(), required=True)
    memory_total_mb = fields.Integer(allow_none=True, required=True)


class NodeSchema(Schema):
    """GET /api/v1/node."""

    agent_version = fields.String(required=True)
    node_id = fields.String(required=True)
    gpu_backend = fields.String(required=True, metadata={"enum": ["nvml", "fake", "none", "auto"], "description": "auto only while NVML is still opening."})
    driver_version = fields.String(allow_none=True, required=True)
    cuda_driver_version = fields.String(allow_none=True, required=True)
    nvml_version = fields.String(allow_none=True, required=True)
    nvml_hung = fields.String(allow_none=True, required=True, metadata={"description": "Why NVML counts as hung, or null."})
    engine_version = fields.String(allow_none=True, required=True, metadata={"description": "Null while the engine does not answer."})
    cpu_count = fields.Integer(required=True)
    memory_total_mb = fields.Integer(required=True)
    numa_nodes = fields.List(fields.Nested(NumaNodeSchema), required=True)
    gpus = fields.List(fields.Nested(NodeGpuSchema), required=True)
    topology = fields.List(
        fields.List(fields.String(allow_none=True)),
        required=True,
        metadata={"description": "GPU by GPU in index order, as `nvidia-smi topo -m` names the link: X, NV<links>, PIX, PXB, PHB, NODE, SYS, BOARD; null where NVML cannot say."},
    )
    drain = fields.Nested(DrainSchema, required=True)


class GpuMetricsSchema(Schema):
    id = fields.Integer(required=True)
    temperature_c = fields.Integer(allow_none=True, required=True)
    memory_total_mb = fields.Integer(allow_none=True, required=True)
    memory_used_mb = fields.Integer(allow_none=True, required=True)
    name = fields.String(allow_none=True, required=True)
    uuid = fields.String(allow_none=True, required=True)
    busy = fields.Boolean(required=True, metadata={"description": "Not free: the allocator would not give it now."})
    usage_percent = fields.Float(allow_none=True, required=True)
    healthy = fields.Boolean(required=True, metadata={"description": "Neither lost nor quarantined."})
    state = fields.String(required=True, metadata={"enum": GPU_STATES})


class SystemMetricsSchema(Schema):
    cpu_usage_percent = fields.Float(required=True)
    memory_usage_percent = fields.Float(required=True)
    memory_total_mb = fields.Integer(required=True)
    memory_used_mb = fields.Integer(required=True)
    disk_usage_percent = fields.Float(required=True)
    load_average = fields.Float(required=True)
    uptime = fields.Integer(required=True)


class MetricsSchema(Schema):
    node_id = fields.String(required=True)
    cpu_usage_percent = fields.Float(required=True)
    memory_usage_percent = fields.Float(required=True)
    gpus = fields.List(fields.Nested(GpuMetricsSchema), required=True)
    gpus_stale = fields.Boolean(required=True, metadata={"description": "True while NVML is hung: the GPU figures are the last good sample."})
    gpus_sampled_at = fields.Float(allow_none=True, required=True, metadata={"description": "Unix time of the GPU sample."})
    system = fields.Nested(SystemMetricsSchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "unhealthy"]))
    timestamp = fields.String(required=True)
    draining = fields.Boolean(required=True, metadata={"description": "The node takes no new claims; it stays healthy."})
    reason = fields.String()


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "A stable machine-readable code."})
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Per-field messages, for 400."})
    claim_id = fields.String(metadata={"description": "The claim, for 409 claim_exists and 409 gpu_held."})
    container_id = fields.String(
        allow_none=True,
        metadata={"description": "The existing container, for 409 claim_exists (null when it went away meanwhile)."},
    )
    requested = fields.Integer(metadata={"description": "How many GPUs were asked for, for 409 no_gpus_free."})
    free_gpus = fields.Integer(metadata={"description": "How many GPUs are free, for 409 no_gpus_free."})
    host_port = fields.Integer(metadata={"description": "The host port that is taken, for 409 port_taken."})
    image = fields.String(metadata={"description": "The image that could not be pulled, for 502 image_pull_failed."})
    reason = fields.String(metadata={"description": "The operator's reason, for 409 node_draining."})


def load_request(schema: Schema, payload) -> dict:
    """Validate a JSON body with `schema`, raising InvalidRequest with per-field messages."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"_schema": ["expected a JSON object"]})
    try:
        return schema.load(payload)
    except ValidationError as exc:
        raise InvalidRequest("the request body is invalid", errors=exc.messages) from None
