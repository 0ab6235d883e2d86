"""Containers of claims: create, list, show, delete."""

from __future__ import annotations

import logging
import re

from flask import Blueprint, g, jsonify, request, url_for

from ..app import services
from ..errors import AgentError, ClaimExists, InvalidRequest
from ..policy import build_spec
from ..prometheus import CREATES, DELETES
from ..schemas import CLAIM_ID_PATTERN, CreateContainerSchema, load_request
from .bodies import json_body

log = logging.getLogger("utopia_agent.containers")
blueprint = Blueprint("containers", __name__, url_prefix="/containers")
_create_schema = CreateContainerSchema()


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
    existing = agent.docker.find_claim(spec.claim_id)
    if existing:
        raise ClaimExists.held_by(spec.claim_id, existing)
    agent.allocator.admit(data["gpu_count"])
    agent.docker.ensure_image(spec.image)
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
            log.error("container rollback failed claim=%s container=%s gpus=%s reason=%s cleanup=%s", spec.claim_id, container_id[:12], gpus, reason, cleanup.code, extra=event)
            raise error from None
        log.warning("container rolled back claim=%s container=%s gpus=%s reason=%s", spec.claim_id, container_id[:12], gpus, reason, extra=event)
        raise
    log.info("container created claim=%s container=%s gpus=%s", spec.claim_id, container_id[:12], gpus, extra=event)
    return container_id


@blueprint.get("")
def list_containers():
    claim_id = request.args.get("claim_id")
    if claim_id is not None and not re.fullmatch(CLAIM_ID_PATTERN, claim_id):
        raise InvalidRequest("claim_id is not a valid claim id", errors={"claim_id": ["invalid claim id"]})
    return jsonify([c.to_dict() for c in services().docker.list_managed(claim_id=claim_id)])


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
