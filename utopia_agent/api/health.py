"""/health for load balancers: no auth, and no engine round trip when a recent call answered."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, jsonify

from ..services import services
from ..errors import EngineUnavailable

blueprint = Blueprint("health", __name__)

# An engine call that succeeded this recently is proof enough that the engine answers.
TRUST_RECENT_ANSWER_SECONDS = 2.0


@blueprint.get("/health")
def health():
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    docker = services().docker
    if not docker.answered_within(TRUST_RECENT_ANSWER_SECONDS):
        try:
            docker.ping()
        except EngineUnavailable as error:
            response = jsonify({"status": "unhealthy", "timestamp": timestamp, "reason": error.message})
            response.status_code = 503
            response.headers.update(error.headers())
            return response
    return jsonify({"status": "healthy", "timestamp": timestamp})
