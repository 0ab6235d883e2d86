"""Node metrics: system figures from psutil and per-GPU figures from the GPU sampler's last sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint

from ..errors import AgentError
from ..gpus.health import GpuView
from ..node.schemas import MetricsSchema
from ..services import services
from .operations import Responds, Routes

blueprint = Blueprint("metrics", __name__, url_prefix="/metrics")
routes = Routes(blueprint, tag="node")


@dataclass(frozen=True)
class NodeMetrics:
    node_id: str
    gpus: list[GpuView]
    gpus_stale: bool
    gpus_sampled_at: float | None
    system: dict[str, Any]


@routes.get("", "getNodeMetrics", summary="Node and GPU metrics",
            responds=Responds(200, "The node's figures, also while the engine is down.", MetricsSchema()))
def get_metrics() -> NodeMetrics:
    """Answers with what it can read while the engine is down or NVML is hung (then the GPU
    figures are the last good sample, and `gpus_stale` says so)."""
    agent = services()
    try:
        holders = agent.gpus.listed_holders()
    except AgentError:
        holders = {}
    sample = agent.gpus.sampler.latest()
    return NodeMetrics(
        node_id=agent.config.node_id,
        gpus=agent.gpus.views(holders, sample),
        gpus_stale=sample is None or agent.gpus.sampler.hung() is not None,
        gpus_sampled_at=round(sample.taken_at, 3) if sample is not None else None,
        system=agent.system.read(),
    )
