"""GET /openapi.json: the OpenAPI 3 document, generated from the marshmallow schemas."""

from __future__ import annotations

from functools import lru_cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, jsonify

from .. import __version__
from ..schemas import (
    CLAIM_ID_PATTERN,
    CONTAINER_ID_PATTERN,
    ContainerSchema,
    CreateContainerSchema,
    CreatedSchema,
    DrainSchema,
    ErrorSchema,
    GpuSchema,
    HealthSchema,
    MetricsSchema,
    NodeSchema,
    ReasonSchema,
)

blueprint = Blueprint("openapi", __name__)

_ERRORS = {
    400: "The body is not JSON, or a field is missing, unknown, of the wrong type or out of range.",
    401: "Missing, malformed or wrong bearer token.",
    403: "Forbidden by node policy (volume, port range, reserved env var).",
    404: "No managed container with that id.",
    409: "The claim already has a container, not enough GPUs are free, a host port is taken, or the node is draining (node_draining, with the reason).",
    413: "The body is larger than the node allows.",
    502: "The image could not be pulled, or the engine failed.",
    503: "The Docker engine is unreachable, or (for a create with GPUs) NVML is hung; retry after Retry-After seconds.",
}


def _error_responses(*statuses: int, **descriptions: str) -> dict:
    """Error responses of the given statuses; `e404="..."` and the like say what that status means here."""
    return {
        str(s): {"description": descriptions.get(f"e{s}", _ERRORS[s]), "content": {"application/json": {"schema": "Error"}}}
        for s in statuses
    }


def _json(description: str, schema) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_CONTAINER_ID = {
    "name": "container_id",
    "in": "path",
    "required": True,
    "description": "The full container id or a unique prefix of at least 12 hex digits.",
    "schema": {"type": "string", "pattern": CONTAINER_ID_PATTERN},
}
_GPU_UUID = {
    "name": "uuid",
    "in": "path",
    "required": True,
    "description": "The GPU's UUID, as NVML reports it (GPU-...).",
    "schema": {"type": "string"},
}
_REASON_BODY = {"required": True, "content": {"application/json": {"schema": "Reason"}}}
_CLAIM_FILTER = {
    "name": "claim_id",
    "in": "query",
    "required": False,
    "description": "Only the container of this claim.",
    "schema": {"type": "string", "pattern": CLAIM_ID_PATTERN},
}


@lru_cache(maxsize=1)
def build_spec() -> dict:
    """The whole document; built once per process, since schemas do not change at run time."""
    spec = APISpec(
        title="Utopia node agent",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Starts Docker containers with exclusive GPUs for claims, and reports node metrics."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for name, schema in [
        ("CreateContainer", CreateContainerSchema),
        ("Created", CreatedSchema),
        ("Container", ContainerSchema),
        ("Metrics", MetricsSchema),
        ("Gpu", GpuSchema),
        ("Drain", DrainSchema),
        ("Node", NodeSchema),
        ("Reason", ReasonSchema),
        ("Health", HealthSchema),
        ("Error", ErrorSchema),
    ]:
        spec.components.schema(name, schema=schema)
    secured = [{"bearer": []}]
    spec.path(
        path="/api/v1/containers",
        operations={
            "post": {
                "summary": "Create and start the container of a claim",
                "security": secured,
                "requestBody": {"required": True, "content": {"application/json": {"schema": "CreateContainer"}}},
                "responses": {"201": _json("Created and started.", "Created"), **_error_responses(400, 401, 403, 409, 413, 502, 503)},
            },
            "get": {
                "summary": "List the managed containers",
                "security": secured,
                "parameters": [_CLAIM_FILTER],
                "responses": {
                    "200": _json("Every managed container.", {"type": "array", "items": "Container"}),
                    **_error_responses(400, 401, 503),
                },
            },
        },
    )
    spec.path(
        path="/api/v1/containers/{container_id}",
        operations={
            "get": {
                "summary": "Show one managed container",
                "security": secured,
                "parameters": [_CONTAINER_ID],
                "responses": {"200": _json("The container.", "Container"), **_error_responses(401, 404, 503)},
            },
            "delete": {
                "summary": "Stop and remove a managed container, freeing its GPUs and ports",
                "security": secured,
                "parameters": [_CONTAINER_ID],
                "responses": {"204": {"description": "Removed."}, **_error_responses(401, 404, 502, 503)},
            },
        },
    )
    spec.path(
        path="/api/v1/metrics",
        operations={
            "get": {
                "summary": "Node and GPU metrics",
                "security": secured,
                "responses": {"200": _json("The node's figures.", "Metrics"), **_error_responses(401)},
            }
        },
    )
    spec.path(
        path="/api/v1/gpus",
        operations={
            "get": {
                "summary": "Every GPU with its state (free, allocated, releasing, quarantined, lost) and why",
                "security": secured,
                "responses": {"200": _json("Every GPU, in index order.", {"type": "array", "items": "Gpu"}), **_error_responses(401, 503)},
            }
        },
    )
    no_gpu = "No GPU with that UUID on this node."
    spec.path(
        path="/api/v1/gpus/{uuid}/quarantine",
        operations={
            "post": {
                "summary": "Quarantine a GPU: it is never given to a claim until released (a claim holding it keeps it)",
                "security": secured,
                "parameters": [_GPU_UUID],
                "requestBody": _REASON_BODY,
                "responses": {"200": _json("Quarantined.", "Gpu"), **_error_responses(400, 401, 404, 503, e404=no_gpu)},
            },
            "delete": {
                "summary": "Release a GPU's quarantine, whatever put it there",
                "security": secured,
                "parameters": [_GPU_UUID],
                "responses": {
                    "200": _json("Released (or was not quarantined).", "Gpu"),
                    **_error_responses(401, 404, 409, 503, e404=no_gpu, e409="A claim still holds the GPU (gpu_held, naming the claim)."),
                },
            },
        },
    )
    spec.path(
        path="/api/v1/node",
        operations={
            "get": {
                "summary": "The node: versions, CPUs, memory, NUMA nodes, GPUs with their topology, drain state",
                "security": secured,
                "responses": {"200": _json("The node.", "Node"), **_error_responses(401)},
            }
        },
    )
    spec.path(
        path="/api/v1/node/drain",
        operations={
            "post": {
                "summary": "Drain: creates get 409 node_draining with the reason; everything else works; kept across restarts",
                "security": secured,
                "requestBody": _REASON_BODY,
                "responses": {"200": _json("Draining.", "Drain"), **_error_responses(400, 401, 503)},
            },
            "delete": {
                "summary": "Resume taking claims",
                "security": secured,
                "responses": {"200": _json("Taking claims.", "Drain"), **_error_responses(401, 503)},
            },
        },
    )
    spec.path(
        path="/health",
        operations={
            "get": {
                "summary": "Liveness for load balancers; no auth",
                "responses": {
                    "200": _json("The engine answers and NVML is not hung (a draining node is healthy).", "Health"),
                    "503": _json("The engine does not answer, or NVML is hung; `reason` says which.", "Health"),
                },
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "summary": "Prometheus text exposition: dcgm-exporter's GPU series and utopia_agent_* series",
                "description": "Needs the bearer token unless UTOPIA_AGENT_PROMETHEUS_AUTH=none.",
                "security": [{"bearer": []}, {}],
                "responses": {
                    "200": {"description": "The exposition.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_error_responses(401),
                },
            }
        },
    )
    spec.path(
        path="/openapi.json",
        operations={
            "get": {
                "summary": "This document; no auth",
                "responses": {"200": {"description": "OpenAPI 3.", "content": {"application/json": {"schema": {"type": "object"}}}}},
            }
        },
    )
    return spec.to_dict()


@blueprint.get("/openapi.json")
def openapi_document():
    return jsonify(build_spec())
