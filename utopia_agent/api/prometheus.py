"""GET /metrics: Prometheus text exposition; auth per UTOPIA_AGENT_PROMETHEUS_AUTH."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import require_token
from ..observability.prometheus import exposition
from ..services import services
from .operations import Responds, operation

blueprint = Blueprint("prometheus", __name__)


@blueprint.get("/metrics")
@operation(
    "getPrometheusMetrics",
    tag="node",
    summary="Prometheus text exposition: dcgm-exporter's GPU series and utopia_agent_* series",
    description="Needs the bearer token (or the read-only one) unless UTOPIA_AGENT_PROMETHEUS_AUTH=none.",
    security=({"bearer": []}, {}),
    responds=Responds(200, "The exposition.", content_type="text/plain"),
)
def prometheus_metrics():
    agent = services()
    if agent.config.prometheus_auth == "token":
        require_token(agent.config)
    return Response(exposition(agent), mimetype=CONTENT_TYPE_LATEST)
