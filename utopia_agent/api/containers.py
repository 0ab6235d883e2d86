"""Containers of claims: create, list, show, delete, and their logs and usage."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from operator import attrgetter

from flask import Blueprint, Response, g, url_for

from ..errors import (
    NetworkUnprotected,
    AgentError,
    AllocationBusy,
    ClaimExists,
    Conflict,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    ImagePullFailed,
    ImageUnavailable,
    InsufficientStorage,
    InvalidRequest,
    NodeDraining,
    NodeFault,
    NoGpusFree,
    NotEnoughResources,
    NotManaged,
    NvmlHung,
    PolicyViolation,
    PortTaken,
    TooManyFollowers,
    VolumeInUse,
    VolumeNotFound,
)
from ..gpus.inventory import GpuStatus
from ..engine.image_pull import RegistryAuth
from ..claims.holders import gpu_claims, gpu_holder
from ..claims.records import ManagedContainer
from ..allocation.policy import build_container_spec, check_image_labels
from ..observability.prometheus import CREATES, DELETES
from ..schemas import (
    ContainerPathSchema,
    ContainerSchema,
    ContainerStatsSchema,
    CreateContainerSchema,
    CreatedSchema,
    ListContainersQuerySchema,
    LogsQuerySchema,
)
from ..services import services
from .events import REVISION_HEADER
from .operations import ENGINE_DOWN, LIST_FAILED, LOCK_OR_ENGINE, RenderedWhileSame, Reply, Responds, Routes, fails

log = logging.getLogger("utopia_agent.containers")
blueprint = Blueprint("containers", __name__, url_prefix="/containers")
routes = Routes(blueprint, tag="containers", path=ContainerPathSchema())
_container = ContainerSchema()
_containers = ContainerSchema(many=True)
_rendered = RenderedWhileSame(_container)
NOT_MANAGED = fails("No managed container with that id; containers the agent does not manage are never shown or touched.", NotManaged)
INSPECT_FAILED = fails("The engine failed to inspect the container.", EngineError)
_MIB = 1024 * 1024
# Followed logs each hold one of a worker's 8 threads for minutes: at most this many per worker,
# so /health and every other request always find a free thread.
MAX_FOLLOWERS_PER_WORKER = 2
_followers = threading.BoundedSemaphore(MAX_FOLLOWERS_PER_WORKER)


@dataclass(frozen=True)
class Created:
    container_id: str


def _noting_claim(container: ManagedContainer) -> ManagedContainer:
    """`container`, its claim noted for this request's log line."""
    g.claim_id = container.claim_id
    return container


def counted_as_create(view: Callable) -> Callable:
    """Count every create by its outcome, refusals of the body included."""

    @wraps(view)
    def counted(**arguments):
        try:
            response = view(**arguments)
        except AgentError as error:
            CREATES.labels(error.code).inc()
            raise
        CREATES.labels("created").inc()
        return response

    return counted


@routes.post("", "createContainer", wrapped_by=counted_as_create, summary="Create and start the container of a claim",
             body=CreateContainerSchema(),
             responds=Responds(201, "Created and started.", CreatedSchema()),
             failures=(
                 fails(
                     "The body is not JSON, or a field is missing, unknown, of the wrong type or out of range, with "
                     "per-field `errors`; or the engine refused the container as asked (say, a command not found "
                     "in the image, or a working dir it cannot use), with the engine's reason; or the registry refused "
                     "the image (`image_unavailable`: wrong or missing credentials, also for an image pulled with "
                     "credentials and cached here, or no such repository or tag).",
                     InvalidRequest, EngineRejected, ImageUnavailable,
                 ),
                 fails(
                     "Forbidden by node policy: a volume outside the volume roots, missing, through a symlink or "
                     "overlapping another, a reserved env var, a host port outside the node's range, or an image "
                     "carrying utopia.* labels.",
                     PolicyViolation,
                 ),
                 fails(
                     "The claim already has a container (the body names it), not enough GPUs, CPUs or memory are "
                     "free (or the node has no GPUs), a host port is taken, or the container's name is held by a "
                     "container the agent does not manage, or the node is draining (`node_draining`, with the reason).",
                     ClaimExists, NoGpusFree, NotEnoughResources, PortTaken, NodeDraining, Conflict,
                 ),
                 fails("A claim volume of `mounts` is mounted read-write by another claim, or (for a read-write mount) by any: "
                       "`claim_id` names it.", VolumeInUse),
                 fails("A claim volume of `mounts` does not exist (nothing was made).", VolumeNotFound),
                 fails("The node failed the request: the agent could not pin the claim's volumes, or does not see the engine's data root "
                       "(whose filesystem sizes the claims' disks) at the engine's path.", NodeFault),
                 fails(
                     "The image could not be pulled: the registry or the network failed, or the pull stalled (the "
                     "reason; worth retrying), or the engine failed on the node's side: network, storage or runtime.",
                     ImagePullFailed, EngineError,
                 ),
                 fails(
                     "The Docker engine is unreachable or slow, other creates held the allocation lock too "
                     "long, (for a create with GPUs) NVML is hung, or the claims' network isolation is not in "
                     "place (`network_unprotected`); retry after Retry-After seconds.",
                     EngineUnavailable, AllocationBusy, NvmlHung, NetworkUnprotected,
                 ),
                 fails(
                     "No room: the engine's image store for the pull, even after collecting unused images (`image`); the node is under "
                     "disk pressure (`filesystem` names the engine's data root or the state dir); or the agent's state dir is full "
                     "(`filesystem`). Nothing is left behind.",
                     InsufficientStorage,
                 ),
             ))
def create_container(body: dict):
    """Apply policy, pull, allocate and create under the lock, then start or roll back."""
    g.claim_id = body["claim_id"]
    agent = services()
    spec = build_container_spec(body, agent.config)
    # The node view answers at no cost; a container it still shows may have gone a moment ago
    # (removed behind the agent's back), so a 409 is only answered once the engine confirms it.
    existing = agent.docker.find_claim(spec.claim_id) and agent.docker.claim_holder(spec.claim_id)
    if existing:
        raise ClaimExists.held_by(spec.claim_id, existing.container_id, existing.spec_digest == spec.spec_digest)
    agent.allocator.admit(body["gpu_count"])
    agent.pressure.refuse_if_pressed()
    for mount in spec.mounts:  # before any pull: an unknown volume is 404 with nothing made (checked again under the lock)
        agent.volumes.store.get(mount.volume)
    if (unprotected := agent.network.problem()) is not None:
        raise NetworkUnprotected(unprotected)
    auth = RegistryAuth.of(body)
    check_image_labels(spec.image, agent.images.ensure(spec.image, auth))
    container_id, spec = agent.allocator.create(spec, body["gpu_count"])
    event = {"claim_id": spec.claim_id, "container_id": container_id, "gpu_ids": list(spec.gpu_ids)}
    gpus = ",".join(map(str, spec.gpu_ids)) or "-"
    try:
        agent.docker.start(container_id)
    except Exception as error:
        reason = error.code if isinstance(error, AgentError) else type(error).__name__
        try:
            agent.docker.remove(container_id, grace_seconds=0)
            agent.allocator.release(spec.claim_id)
        except AgentError as cleanup:
            log.error("container rollback failed claim=%s container=%s gpus=%s reason=%s cleanup=%s", spec.claim_id, container_id[:12], gpus, reason,
                cleanup.code, extra=event)
            raise error from None
        log.warning("container rolled back claim=%s container=%s gpus=%s reason=%s", spec.claim_id, container_id[:12], gpus, reason, extra=event)
        raise
    log.info("container created claim=%s container=%s gpus=%s", spec.claim_id, container_id[:12], gpus, extra=event)
    return Reply(Created(container_id), 201, {"Location": url_for("api_v1.containers.get_container", container_id=container_id)})


@routes.get("", "listContainers", summary="List the managed containers",
            query=ListContainersQuerySchema(),
            responds=Responds(200, "Every managed container.", _containers),
            failures=(
                fails("A query parameter is unknown or repeated, or `claim_id` is not a valid claim id; `errors` names each.", InvalidRequest),
                LIST_FAILED,
                ENGINE_DOWN,
            ))
def list_containers(query: dict):
    """The list with the history's revision it is exact at (X-Utopia-Revision): watch the events from it."""
    claim_id = query.get("claim_id")
    agent = services()
    if claim_id is not None:
        revision = agent.events.history.revision()
        return Reply(agent.docker.list_managed(claim_id=claim_id), 200, {REVISION_HEADER: str(revision)})
    containers, revision = agent.docker.listing(agent.events.history)
    response = _rendered.list_response(containers, key=attrgetter("id"))
    response.headers[REVISION_HEADER] = str(revision)
    return response


@routes.get("/<container_id>", "getContainer", summary="Show one managed container",
            responds=Responds(200, "The container.", _container),
            failures=(NOT_MANAGED, INSPECT_FAILED, ENGINE_DOWN))
def get_container(container_id: str) -> Response:
    container = _noting_claim(services().docker.get_managed(container_id))
    return _rendered.response(container, key=container.id)


@routes.delete("/<container_id>", "deleteContainer", summary="Stop and remove a managed container, freeing its GPUs and ports",
               responds=Responds(204, "Removed.", content_type=None),
               failures=(NOT_MANAGED, fails("The engine failed to stop or remove the container.", EngineError), ENGINE_DOWN))
def delete_container(container_id: str):
    agent = services()
    container = _noting_claim(agent.docker.delete_managed(container_id))
    agent.allocator.release(container.claim_id)
    DELETES.inc()
    log.info(
        "container deleted claim=%s container=%s gpus=%s",
        container.claim_id, container.id[:12], ",".join(map(str, container.gpu_ids)) or "-",
        extra={"claim_id": container.claim_id, "container_id": container.id, "gpu_ids": list(container.gpu_ids)},
    )
    return Reply(None, 204)


@routes.post("/<container_id>/stop", "stopContainer",
             summary="Stop a claim and free its GPUs, exclusive CPUs and host ports; keep its container, writable layer and volumes",
             responds=Responds(200, "Stopped: `stopped` is true, and the engine never starts it on its own.", _container),
             failures=(
                 NOT_MANAGED,
                 fails("The container's name is held by a container the agent does not manage.", Conflict),
                 fails("The engine failed to stop the container.", EngineError),
                 LOCK_OR_ENGINE,
             ))
def stop_container(container_id: str) -> ManagedContainer:
    return _noting_claim(services().allocator.stop(container_id))


@routes.post("/<container_id>/start", "startContainer", summary="Start a stopped claim again with the GPUs, ports and CPUs it was made with",
             responds=Responds(200, "Running (or running already).", _container),
             failures=(
                 NOT_MANAGED,
                 fails(
                     "Another claim holds one of its GPUs (`no_gpus_free`, naming the GPU and the claim; also for a GPU "
                     "quarantined or lost since), host ports (`port_taken`) or exclusive CPUs, or its CPU and memory no "
                     "longer fit (`not_enough_resources`), or the node is draining (`node_draining`).",
                     NoGpusFree, PortTaken, NotEnoughResources, NodeDraining, Conflict,
                 ),
                 fails("The engine refused to start the container, with its reason.", EngineRejected),
                 fails("The engine failed to start the container.", EngineError),
                 fails("The Docker engine is unreachable or slow, other requests held the allocation lock too long, or NVML is hung.",
                       EngineUnavailable, AllocationBusy, NvmlHung),
             ))
def start_container(container_id: str) -> ManagedContainer:
    return _noting_claim(services().allocator.start(container_id))


@routes.get("/<container_id>/logs", "getContainerLogs", summary="The container's stdout and stderr, interleaved as the engine kept them",
            query=LogsQuerySchema(),
            responds=Responds(200, "The log lines (streamed with follow).", content_type="text/plain"),
            failures=(
                fails("A query parameter is unknown, repeated or out of range; `errors` names each.", InvalidRequest),
                NOT_MANAGED,
                fails("This worker already streams as many followed logs as it may; retry after Retry-After seconds.", TooManyFollowers),
                fails("The engine failed to read the logs.", EngineError),
                ENGINE_DOWN,
            ))
def container_logs(container_id: str, query: dict):
    """stdout and stderr as the engine kept them; with follow, new lines until the container stops
    or UTOPIA_AGENT_LOG_FOLLOW_SECONDS pass, whichever comes first."""
    agent = services()
    container = _noting_claim(agent.docker.get_managed(container_id))
    # Milliseconds are plenty, and keep the engine from reading a tiny float's exponent; 0 is "from the start".
    since = round(query.get("since", 0.0), 3) or None
    options = {"tail": query["tail"], "since": since, "timestamps": query["timestamps"]}
    if not query["follow"]:
        return Response(agent.docker.logs(container.id, **options), mimetype="text/plain")
    if not _followers.acquire(blocking=False):
        raise TooManyFollowers(f"this worker already streams {MAX_FOLLOWERS_PER_WORKER} followed logs; retry later or read without follow")
    try:
        stream = agent.docker.follow_logs(container.id, **options)
    except BaseException:
        _followers.release()
        raise
    deadline = threading.Timer(agent.config.log_follow_seconds, stream.close)
    deadline.daemon = True
    deadline.start()

    def finish() -> None:
        deadline.cancel()
        stream.close()
        _followers.release()

    response = Response(iter(stream), mimetype="text/plain", headers={"X-Accel-Buffering": "no"})
    # Called by the server when the response ends, however it ends (client gone included).
    response.call_on_close(finish)
    return response


@dataclass(frozen=True)
class ContainerStats:
    cpu_percent: float
    memory_used_mb: int
    memory_limit_mb: int | None
    gpus: list[GpuStatus]
    disk_used_mb: int | None
    disk_limit_mb: int | None


@routes.get("/<container_id>/stats", "getContainerStats", summary="The container's CPU and memory (from its cgroup), its GPUs' figures and its container disk",
            responds=Responds(200, "The container's usage.", ContainerStatsSchema()),
            failures=(NOT_MANAGED, INSPECT_FAILED, ENGINE_DOWN))
def container_stats(container_id: str) -> ContainerStats:
    """CPU and memory from the container's cgroup, and its GPUs' figures from the last NVML sample."""
    agent = services()
    container = _noting_claim(agent.docker.get_managed(container_id))
    usage, cpu_percent = agent.usage.now(container.id, container.started)
    if usage is not None:
        used_mb = usage.memory_used_bytes // _MIB
        limit_mb = usage.memory_limit_bytes // _MIB if usage.memory_limit_bytes is not None else None
    else:
        used_mb, limit_mb = 0, container.resources["memory_mb"]
    held = gpu_claims([container.holdings])
    sample = agent.gpus.sampler.latest()  # the background sampler's: never NVML on the request path
    gpus = [gpu for gpu in (sample.gpus if sample is not None else ()) if gpu_holder(gpu, held)]
    disk_used = agent.disks.used_bytes(container.id)  # the background measurement's: never a walk on the request path
    disk_gb = container.resources["disk_gb"]
    return ContainerStats(cpu_percent, used_mb, limit_mb, gpus, disk_used // _MIB if disk_used is not None else None,
                          round(disk_gb * 1024) if disk_gb is not None else None)
