"""/health for load balancers: no auth, no NVML call, and no engine round trip when a recent call answered."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, UTC

from flask import Blueprint

from ..errors import EngineUnavailable, NetworkUnprotected, NvmlHung
from ..schemas import HealthSchema
from ..services import services
from .operations import Reply, Responds, Routes

blueprint = Blueprint("health", __name__)
routes = Routes(blueprint, tag="service")
_health = HealthSchema()

# An engine call that succeeded this recently is proof enough that the engine answers.
TRUST_RECENT_ANSWER_SECONDS = 2.0


@dataclass(frozen=True)
class Health:
    status: str
    timestamp: str
    draining: bool
    disk_pressure: bool
    reason: str | None = None


@routes.get("/health", "getHealth", summary="Liveness for load balancers; no auth",
            responds=(
                Responds(200, "The engine answers, NVML is not hung and claims are isolated (a draining node, or one under disk pressure, is healthy).",
                         _health),
                Responds(503, "The engine does not answer, NVML is hung, or the claims' network isolation is not in place; "
                              "`reason` says which.", _health),
            ))
def health():
    """503 while NVML is hung, the engine does not answer or claims would run unprotected; a
    draining node stays healthy."""
    agent = services()
    healthy = Health("healthy", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"), agent.node.state()["draining"],
                     bool(agent.pressure.pressed()))
    try:
        hung = agent.gpus.sampler.hung()
        if hung is not None:
            raise NvmlHung(hung)
        if not agent.docker.answered_within(TRUST_RECENT_ANSWER_SECONDS):
            agent.docker.ping()
        if (unprotected := agent.network.problem()) is not None:
            raise NetworkUnprotected(unprotected)
    except (NvmlHung, EngineUnavailable, NetworkUnprotected) as error:
        return Reply(replace(healthy, status="unhealthy", reason=error.message), 503, error.headers())
    return healthy
