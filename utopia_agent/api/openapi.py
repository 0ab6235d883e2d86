"""GET /openapi.json: the OpenAPI 3 document, generated from the marshmallow schemas."""

from __future__ import annotations

from functools import lru_cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, jsonify

from .. import __version__
from ..errors import (
    AgentError,
    AllocationBusy,
    BodyTooLarge,
    ClaimExists,
    Conflict,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    ImagePullFailed,
    InvalidRequest,
    GpuHeld,
    GpuNotFound,
    NodeDraining,
    NvmlHung,
    NodeFault,
    NotEnoughResources,
    NoGpusFree,
    NotManaged,
    PolicyViolation,
    PortTaken,
    TooManyFollowers,
    Unauthorized,
)
from ..schemas import (
    CONTAINER_EXAMPLE,
    CONTAINER_ID_PATTERN,
    ContainerSchema,
    ContainerStatsSchema,
    CreateContainerSchema,
    CreatedSchema,
    DrainSchema,
    ErrorSchema,
    GpuSchema,
    HealthSchema,
    ListContainersQuerySchema,
    LogsQuerySchema,
    MetricsSchema,
    NodeSchema,
    ReasonSchema,
)

blueprint = Blueprint("openapi", __name__)

TAGS = [
    {"name": "containers", "description": "The containers of claims: create, list, show, delete."},
    {"name": "node", "description": "The node's CPU, memory, disk and GPU figures, as JSON and for Prometheus."},
    {"name": "gpus", "description": "Each GPU's state, and the operator's quarantine."},
    {"name": "service", "description": "Liveness and this document; no token needed."},
]


def _failure(description: str, *errors: type[AgentError]) -> dict:
    """One error response of an operation: its status, and the `error` codes it may carry, come
    from the error classes; the description says when this operation answers it."""
    statuses = {error.status for error in errors}
    assert len(statuses) == 1, f"one status per response, got {statuses}"
    codes = ", ".join(f"`{error.code}`" for error in errors)
    return {
        str(statuses.pop()): {
            "description": f"{description} (`error`: {codes})",
            "content": {"application/json": {"schema": "Error"}},
        }
    }


def _json(description: str, schema) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_UNAUTHORIZED = _failure("Missing, malformed or wrong bearer token.", Unauthorized)
_ENGINE_DOWN = _failure("The Docker engine is unreachable or slow; retry after Retry-After seconds.", EngineUnavailable)
_NOT_MANAGED = _failure("No managed container with that id; containers the agent does not manage are never shown or touched.", NotManaged)

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


@lru_cache(maxsize=1)
def build_spec() -> dict:
    """The whole document; built once per process, since schemas do not change at run time."""
    spec = APISpec(
        title="Utopia node agent",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Starts Docker containers with exclusive GPUs for claims, and reports node metrics."},
        tags=TAGS,
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for name, schema in [
        ("CreateContainer", CreateContainerSchema),
        ("Created", CreatedSchema),
        ("ContainerStats", ContainerStatsSchema),
        ("Metrics", MetricsSchema),
        ("Gpu", GpuSchema),
        ("Drain", DrainSchema),
        ("Node", NodeSchema),
        ("Reason", ReasonSchema),
        ("Health", HealthSchema),
        ("Error", ErrorSchema),
    ]:
        spec.components.schema(name, schema=schema)
    spec.components.schema("Container", component={"example": CONTAINER_EXAMPLE}, schema=ContainerSchema)
    secured = [{"bearer": []}]
    spec.path(
        path="/api/v1/containers",
        operations={
            "post": {
                "operationId": "createContainer",
                "tags": ["containers"],
                "summary": "Create and start the container of a claim",
                "security": secured,
                "requestBody": {"required": True, "content": {"application/json": {"schema": "CreateContainer"}}},
                "responses": {
                    "201": _json("Created and started.", "Created"),
                    **_failure(
                        "The body is not JSON, or a field is missing, unknown, of the wrong type or out of range, with "
                        "per-field `errors`; or the engine refused the container as asked (say, a command not found "
                        "in the image, or a working dir it cannot use), with the engine's reason.",
                        InvalidRequest, EngineRejected,
                    ),
                    **_UNAUTHORIZED,
                    **_failure(
                        "Forbidden by node policy: a volume outside the volume roots, missing, through a symlink or "
                        "overlapping another, a reserved env var, a host port outside the node's range, or an image "
                        "carrying utopia.* labels.",
                        PolicyViolation,
                    ),
                    **_failure(
                        "The claim already has a container (the body names it), not enough GPUs, CPUs or memory are "
                        "free (or the node has no GPUs), a host port is taken, or the container's name is held by a "
                        "container the agent does not manage, or the node is draining (`node_draining`, with the reason).",
                        ClaimExists, NoGpusFree, NotEnoughResources, PortTaken, NodeDraining, Conflict,
                    ),
                    **_failure("The body is larger than the node's UTOPIA_AGENT_MAX_BODY_BYTES.", BodyTooLarge),
                    **_failure("The node failed the request: the agent could not pin the claim's volumes.", NodeFault),
                    **_failure(
                        "The image could not be pulled (the registry's reason), or the engine failed on the node's "
                        "side: network, storage or runtime.",
                        ImagePullFailed, EngineError,
                    ),
                    **_failure(
                        "The Docker engine is unreachable or slow, other creates held the allocation lock too "
                        "long, or (for a create with GPUs) NVML is hung; retry after Retry-After seconds.",
                        EngineUnavailable, AllocationBusy, NvmlHung,
                    ),
                },
            },
            "get": {
                "operationId": "listContainers",
                "tags": ["containers"],
                "summary": "List the managed containers",
                "security": secured,
                "parameters": [{"in": "query", "schema": ListContainersQuerySchema}],
                "responses": {
                    "200": _json("Every managed container.", {"type": "array", "items": "Container"}),
                    **_failure(
                        "A query parameter is unknown or repeated, or `claim_id` is not a valid claim id; "
                        "`errors` names each.",
                        InvalidRequest,
                    ),
                    **_UNAUTHORIZED,
                    **_failure("The engine failed to list the containers.", EngineError),
                    **_ENGINE_DOWN,
                },
            },
        },
    )
    spec.path(
        path="/api/v1/containers/{container_id}",
        operations={
            "get": {
                "operationId": "getContainer",
                "tags": ["containers"],
                "summary": "Show one managed container",
                "security": secured,
                "parameters": [_CONTAINER_ID],
                "responses": {"200": _json("The container.", "Container"), **_UNAUTHORIZED, **_NOT_MANAGED,
                    **_failure("The engine failed to inspect the container.", EngineError), **_ENGINE_DOWN},
            },
            "delete": {
                "operationId": "deleteContainer",
                "tags": ["containers"],
                "summary": "Stop and remove a managed container, freeing its GPUs and ports",
                "security": secured,
                "parameters": [_CONTAINER_ID],
                "responses": {
                    "204": {"description": "Removed."},
                    **_UNAUTHORIZED,
                    **_NOT_MANAGED,
                    **_failure("The engine failed to stop or remove the container.", EngineError),
                    **_ENGINE_DOWN,
                },
            },
        },
    )
    spec.path(
        path="/api/v1/containers/{container_id}/logs",
        operations={
            "get": {
                "operationId": "getContainerLogs",
                "tags": ["containers"],
                "summary": "The container's stdout and stderr, interleaved as the engine kept them",
                "security": secured,
                "parameters": [_CONTAINER_ID, {"in": "query", "schema": LogsQuerySchema}],
                "responses": {
                    "200": {"description": "The log lines (streamed with follow).", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_failure("A query parameter is unknown, repeated or out of range; `errors` names each.", InvalidRequest),
                    **_UNAUTHORIZED,
                    **_NOT_MANAGED,
                    **_failure("This worker already streams as many followed logs as it may; retry after Retry-After seconds.", TooManyFollowers),
                    **_failure("The engine failed to read the logs.", EngineError),
                    **_ENGINE_DOWN,
                },
            }
        },
    )
    spec.path(
        path="/api/v1/containers/{container_id}/stats",
        operations={
            "get": {
                "operationId": "getContainerStats",
                "tags": ["containers"],
                "summary": "The container's CPU and memory (from its cgroup) and its GPUs' figures",
                "security": secured,
                "parameters": [_CONTAINER_ID],
                "responses": {"200": _json("The container's usage.", "ContainerStats"), **_UNAUTHORIZED, **_NOT_MANAGED,
                    **_failure("The engine failed to inspect the container.", EngineError), **_ENGINE_DOWN},
            }
        },
    )
    spec.path(
        path="/api/v1/metrics",
        operations={
            "get": {
                "operationId": "getNodeMetrics",
                "tags": ["node"],
                "summary": "Node and GPU metrics",
                "security": secured,
                "responses": {"200": _json("The node's figures, also while the engine is down.", "Metrics"), **_UNAUTHORIZED},
            }
        },
    )
    spec.path(
        path="/api/v1/gpus",
        operations={
            "get": {
                "operationId": "listGpus",
                "tags": ["gpus"],
                "summary": "Every GPU with its state (free, allocated, releasing, quarantined, lost) and why",
                "security": secured,
                "responses": {"200": _json("Every GPU, in index order.", {"type": "array", "items": "Gpu"}), **_UNAUTHORIZED, **_ENGINE_DOWN},
            }
        },
    )
    no_gpu = _failure("No GPU with that UUID on this node.", GpuNotFound)
    spec.path(
        path="/api/v1/gpus/{uuid}/quarantine",
        operations={
            "post": {
                "operationId": "quarantineGpu",
                "tags": ["gpus"],
                "summary": "Quarantine a GPU: it is never given to a claim until released (a claim holding it keeps it)",
                "security": secured,
                "parameters": [_GPU_UUID],
                "requestBody": _REASON_BODY,
                "responses": {
                    "200": _json("Quarantined.", "Gpu"),
                    **_failure("The body is not JSON or has no valid `reason`; `errors` names the field.", InvalidRequest),
                    **_UNAUTHORIZED,
                    **no_gpu,
                    **_failure("The allocation lock or the GPUs' state could not be had in time; retry after Retry-After seconds.",
                        EngineUnavailable, AllocationBusy),
                },
            },
            "delete": {
                "operationId": "releaseGpu",
                "tags": ["gpus"],
                "summary": "Release a GPU's quarantine, whatever put it there",
                "security": secured,
                "parameters": [_GPU_UUID],
                "responses": {
                    "200": _json("Released (or was not quarantined).", "Gpu"),
                    **_UNAUTHORIZED,
                    **no_gpu,
                    **_failure("A claim still holds the GPU; the body names the claim.", GpuHeld),
                    **_failure("The allocation lock or the GPUs' state could not be had in time; retry after Retry-After seconds.",
                        EngineUnavailable, AllocationBusy),
                },
            },
        },
    )
    spec.path(
        path="/api/v1/node",
        operations={
            "get": {
                "operationId": "getNode",
                "tags": ["node"],
                "summary": "The node: versions, CPUs, memory, NUMA nodes, GPUs with their topology, drain state",
                "security": secured,
                "responses": {"200": _json("The node.", "Node"), **_UNAUTHORIZED},
            }
        },
    )
    spec.path(
        path="/api/v1/node/drain",
        operations={
            "post": {
                "operationId": "drainNode",
                "tags": ["node"],
                "summary": "Drain: creates get 409 node_draining with the reason; everything else works; kept across restarts",
                "security": secured,
                "requestBody": _REASON_BODY,
                "responses": {
                    "200": _json("Draining.", "Drain"),
                    **_failure("The body is not JSON or has no valid `reason`; `errors` names the field.", InvalidRequest),
                    **_UNAUTHORIZED,
                    **_failure("The allocation lock could not be had in time; retry after Retry-After seconds.", AllocationBusy),
                },
            },
            "delete": {
                "operationId": "resumeNode",
                "tags": ["node"],
                "summary": "Resume taking claims",
                "security": secured,
                "responses": {
                    "200": _json("Taking claims.", "Drain"),
                    **_UNAUTHORIZED,
                    **_failure("The allocation lock could not be had in time; retry after Retry-After seconds.", AllocationBusy),
                },
            },
        },
    )
    spec.path(
        path="/health",
        operations={
            "get": {
                "operationId": "getHealth",
                "tags": ["service"],
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
                "operationId": "getPrometheusMetrics",
                "tags": ["node"],
                "summary": "Prometheus text exposition: dcgm-exporter's GPU series and utopia_agent_* series",
                "description": "Needs the bearer token unless UTOPIA_AGENT_PROMETHEUS_AUTH=none.",
                "security": [{"bearer": []}, {}],
                "responses": {
                    "200": {"description": "The exposition.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_UNAUTHORIZED,
                },
            }
        },
    )
    spec.path(
        path="/openapi.json",
        operations={
            "get": {
                "operationId": "getOpenApiDocument",
                "tags": ["service"],
                "summary": "This document; no auth",
                "responses": {"200": {"description": "OpenAPI 3.", "content": {"application/json": {"schema": {"type": "object"}}}}},
            }
        },
    )
    return spec.to_dict()


@blueprint.get("/openapi.json")
def openapi_document():
    return jsonify(build_spec())
