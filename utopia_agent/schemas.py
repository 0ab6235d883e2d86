"""Request and response schemas from the contract: validation and the OpenAPI document both come from here."""

from __future__ import annotations

import re

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from .errors import InvalidRequest

CLAIM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
CONTAINER_ID_PATTERN = r"^[0-9a-f]{12,64}$"
# The engine's reference grammar (distribution/reference), kept to what an orchestrator sends.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?/)"
IMAGE_PATTERN = rf"^{_REGISTRY}?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?$"

MAX_LIST_ITEMS = 256
MAX_STRING = 4096
MAX_ENV_ENTRY = 32 * 1024


class StrictInteger(fields.Integer):
    """An integer that refuses booleans and floats, which JSON callers send by mistake."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


def _no_nul(value: str) -> None:
    if "\x00" in value:
        raise ValidationError("must not contain NUL characters")


def _absolute_path(value: str) -> None:
    _no_nul(value)
    if not value.startswith("/"):
        raise ValidationError("must be an absolute path")


def _env_entry(value: str) -> None:
    _no_nul(value)
    name, sep, _ = value.partition("=")
    if not sep or not re.match(ENV_NAME_PATTERN, name):
        raise ValidationError("must be KEY=VALUE with KEY made of letters, digits and _, not starting with a digit")


def _bounded_text(max_length: int, min_length: int = 0) -> list:
    return [validate.Length(min=min_length, max=max_length), _no_nul]


class PortMappingSchema(Schema):
    host_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    container_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    protocol = fields.String(load_default="tcp", validate=validate.OneOf(["tcp", "udp"]))


class CreateContainerSchema(Schema):
    """POST /api/v1/containers body; unknown fields are refused (marshmallow's default)."""

    claim_id = fields.String(
        required=True,
        validate=validate.Regexp(CLAIM_ID_PATTERN, error="must be 1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        metadata={"description": "The claim this container serves; one live container per claim."},
    )
    image = fields.String(
        required=True,
        validate=[validate.Length(max=512), validate.Regexp(IMAGE_PATTERN, error="is not a valid image reference")],
    )
    gpu_count = StrictInteger(load_default=0, validate=validate.Range(0, 64))
    port_mappings = fields.List(fields.Nested(PortMappingSchema), load_default=list, validate=validate.Length(max=64))
    env_vars = fields.List(
        fields.String(validate=[validate.Length(max=MAX_ENV_ENTRY), _env_entry]),
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
    )
    command = fields.List(
        fields.String(validate=_bounded_text(MAX_STRING)),
        load_default=list,
        validate=validate.Length(max=MAX_LIST_ITEMS),
    )
    working_dir = fields.String(load_default="", validate=[validate.Length(max=MAX_STRING), lambda v: v == "" or _absolute_path(v)])
    volumes = fields.Dict(
        keys=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _absolute_path]),
        values=fields.String(validate=[validate.Length(min=1, max=MAX_STRING), _absolute_path]),
        load_default=dict,
        validate=validate.Length(max=32),
        metadata={"description": "Host path -> container path."},
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


class GpuMetricsSchema(Schema):
    id = fields.Integer(required=True)
    temperature_c = fields.Integer(allow_none=True, required=True)
    memory_total_mb = fields.Integer(allow_none=True, required=True)
    memory_used_mb = fields.Integer(allow_none=True, required=True)
    name = fields.String(allow_none=True, required=True)
    uuid = fields.String(allow_none=True, required=True)
    busy = fields.Boolean(required=True)
    usage_percent = fields.Float(allow_none=True, required=True)
    healthy = fields.Boolean(required=True)


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
    system = fields.Nested(SystemMetricsSchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "unhealthy"]))
    timestamp = fields.String(required=True)
    reason = fields.String()


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "A stable machine-readable code."})
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Per-field messages, for 400."})
    container_id = fields.String(metadata={"description": "The existing container, for a claim that already has one."})
    free_gpus = fields.Integer(metadata={"description": "How many GPUs are free, for 409 no_gpus_free."})


def load_request(schema: Schema, payload) -> dict:
    """Validate a JSON body with `schema`, raising InvalidRequest with per-field messages."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"_schema": ["expected a JSON object"]})
    try:
        return schema.load(payload)
    except ValidationError as exc:
        raise InvalidRequest("the request body is invalid", errors=exc.messages) from None
