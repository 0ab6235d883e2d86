"""/health for load balancers: no auth, no NVML call, and no engine round trip when a recent call answered."""

from __future__ import annotations

from datetime import datetime, UTC

from flask import Blueprint, jsonify

from ..errors import EngineUnavailable, NvmlHung
from ..services import services

blueprint = Blueprint("health", __name__)

# An engine call that succeeded this recently is proof enough that the engine answers.
TRUST_RECENT_ANSWER_SECONDS = 2.0


@blueprint.get("/health")
def health():
    """503 while NVML is hung or the engine does not answer; a draining node stays healthy."""
    agent = services()
    body = {
        "status": "healthy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "draining": agent.node.state()["draining"],
    }
    try:
        hung = agent.gpus.sampler.hung()
        if hung is not None:
            raise NvmlHung(hung)
        if not agent.docker.answered_within(TRUST_RECENT_ANSWER_SECONDS):
            agent.docker.ping()
    except (NvmlHung, EngineUnavailable) as error:
        response = jsonify({**body, "status": "unhealthy", "reason": error.message})
        response.status_code = 503
        response.headers.update(error.headers())
        return response
    return jsonify(body)
