"""GET /metrics: Prometheus text exposition; auth per UTOPIA_AGENT_PROMETHEUS_AUTH."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..services import services
from ..auth import require_token
from ..prometheus import exposition

blueprint = Blueprint("prometheus", __name__)


@blueprint.get("/metrics")
def prometheus_metrics():
    agent = services()
    if agent.config.prometheus_auth == "token":
        require_token(agent.config.token)
    return Response(exposition(agent), mimetype=CONTENT_TYPE_LATEST)
