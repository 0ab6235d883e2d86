"""Containers of claims: create, list, show, delete, and their logs and usage."""

from __future__ import annotations

import logging
import threading

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for

from ..errors import AgentError, ClaimExists, TooManyFollowers
from ..holders import gpu_claims, gpu_holder
from ..policy import build_spec, check_image_labels
from ..prometheus import CREATES, DELETES
from ..schemas import CreateContainerSchema, ListContainersQuerySchema, LogsQuerySchema, load_query, load_request
from ..services import services
from .bodies import json_body

log = logging.getLogger("utopia_agent.containers")
blueprint = Blueprint("containers", __name__, url_prefix="/containers")
_create_schema = CreateContainerSchema()
_list_query_schema = ListContainersQuerySchema()
_logs_query = LogsQuerySchema()
_MIB = 1024 * 1024
# Followed logs each hold one of a worker's 8 threads for minutes: at most this many per worker,
# so /health and every other request always find a free thread.
MAX_FOLLOWERS_PER_WORKER = 2
_followers = threading.BoundedSemaphore(MAX_FOLLOWERS_PER_WORKER)


@blueprint.post("")
def create_container():
    try:
        container_id = _create(json_body())
    except AgentError as error:
        CREATES.labels(error.code).inc()
        raise
    CREATES.labels("created").inc()
    response = jsonify({"container_id": container_id})
    response.status_code = 201
    response.headers["Location"] = url_for("api_v1.containers.get_container", container_id=container_id)
    return response


def _create(payload) -> str:
    """Validate, apply policy, pull, allocate and create under the lock, then start or roll back."""
    data = load_request(_create_schema, payload)
    g.claim_id = data["claim_id"]
    agent = services()
    spec = build_spec(data, agent.config)
    # The node view answers at no cost; a container it still shows may have gone a moment ago
    # (removed behind the agent's back), so a 409 is only answered once the engine confirms it.
    existing = agent.docker.find_claim(spec.claim_id) and agent.docker.find_claim(spec.claim_id, fresh=True)
    if existing:
        raise ClaimExists.held_by(spec.claim_id, existing)
    agent.allocator.admit(data["gpu_count"])
    check_image_labels(spec.image, agent.docker.ensure_image(spec.image))
    container_id, spec = agent.allocator.create(spec, data["gpu_count"])
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
    return container_id


# The whole list's JSON, kept while list_managed gives the same tuple (the node view did not change).
_rendered_list: tuple[object, bytes] = (None, b"")


@blueprint.get("")
def list_containers():
    global _rendered_list
    claim_id = load_query(_list_query_schema, request.args).get("claim_id")
    containers = services().docker.list_managed(claim_id=claim_id)
    if claim_id is not None:
        return jsonify([c.to_dict() for c in containers])
    rendered_from, body = _rendered_list
    if rendered_from is not containers:
        body = f"{current_app.json.dumps([c.to_dict() for c in containers])}\n".encode()
        _rendered_list = (containers, body)
    return current_app.response_class(body, mimetype="application/json")


@blueprint.get("/<container_id>")
def get_container(container_id: str):
    container = services().docker.get_managed(container_id)
    g.claim_id = container.claim_id
    return jsonify(container.to_dict())


@blueprint.delete("/<container_id>")
def delete_container(container_id: str):
    agent = services()
    container = agent.docker.delete_managed(container_id)
    g.claim_id = container.claim_id
    agent.allocator.release(container.claim_id)
    DELETES.inc()
    log.info(
        "container deleted claim=%s container=%s gpus=%s",
        container.claim_id, container.id[:12], ",".join(map(str, container.gpu_ids)) or "-",
        extra={"claim_id": container.claim_id, "container_id": container.id, "gpu_ids": list(container.gpu_ids)},
    )
    return "", 204


@blueprint.get("/<container_id>/logs")
def container_logs(container_id: str):
    """stdout and stderr as the engine kept them; with follow, new lines until the container stops
    or UTOPIA_AGENT_LOG_FOLLOW_SECONDS pass, whichever comes first."""
    query = load_query(_logs_query, request.args)
    agent = services()
    container = agent.docker.get_managed(container_id)
    g.claim_id = container.claim_id
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


@blueprint.get("/<container_id>/stats")
def container_stats(container_id: str):
    """CPU and memory from the container's cgroup, and its GPUs' figures from the last NVML sample."""
    agent = services()
    container = agent.docker.get_managed(container_id)
    g.claim_id = container.claim_id
    usage, cpu_percent = agent.usage.now(container.id, container.started)
    if usage is not None:
        used_mb = usage.memory_used_bytes // _MIB
        limit_mb = usage.memory_limit_bytes // _MIB if usage.memory_limit_bytes is not None else None
    else:
        used_mb, limit_mb = 0, container.resources["memory_mb"]
    held = gpu_claims([container.holdings])
    sample = agent.gpus.sampler.latest()  # the background sampler's: never NVML on the request path
    gpus = [
        {"id": gpu.index, "uuid": gpu.uuid, "memory_used_mb": gpu.memory_used_mb, "usage_percent": gpu.usage_percent}
        for gpu in (sample.gpus if sample is not None else ())
        if gpu_holder(gpu, held)
    ]
    return jsonify({"cpu_percent": cpu_percent, "memory_used_mb": used_mb, "memory_limit_mb": limit_mb, "gpus": gpus})
