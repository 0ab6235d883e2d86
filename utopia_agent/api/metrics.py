"""Node metrics: system figures from psutil and per-GPU figures from the GPU sampler's last sample."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..services import services
from ..errors import AgentError
from ..holders import gpu_claims

blueprint = Blueprint("metrics", __name__, url_prefix="/metrics")


def node_metrics() -> dict:
    """The metrics object; answers with what it can read while the engine is down or NVML is hung
    (then the GPU figures are the last good sample, and `gpus_stale` says so)."""
    agent = services()
    try:
        holders = gpu_claims(container.holdings for container in agent.docker.list_managed())
    except AgentError:
        holders = {}
    sample = agent.gpus.sampler.latest()
    system = agent.system.read()
    gpus = [
        {
            "id": view.status.index,
            "temperature_c": view.status.temperature_c,
            "memory_total_mb": view.status.memory_total_mb,
            "memory_used_mb": view.status.memory_used_mb,
            "name": view.status.name,
            "uuid": view.status.uuid,
            "busy": view.state != "free",
            "usage_percent": view.status.usage_percent,
            "healthy": view.state not in ("lost", "quarantined"),
            "state": view.state,
        }
        for view in agent.gpus.views(holders, sample)
    ]
    return {
        "node_id": agent.config.node_id,
        "cpu_usage_percent": system["cpu_usage_percent"],
        "memory_usage_percent": system["memory_usage_percent"],
        "gpus": gpus,
        "gpus_stale": sample is None or agent.gpus.sampler.hung() is not None,
        "gpus_sampled_at": round(sample.taken_at, 3) if sample is not None else None,
        "system": system,
    }


@blueprint.get("")
def get_metrics():
    return jsonify(node_metrics())
