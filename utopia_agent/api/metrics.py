"""Node metrics: system figures from psutil and per-GPU figures from the inventory."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..services import services
from ..gpus import gpu_key_held
from ..errors import AgentError

blueprint = Blueprint("metrics", __name__, url_prefix="/metrics")


def node_metrics() -> dict:
    """The metrics object; answers with what it can read even while the engine is down."""
    agent = services()
    try:
        held = agent.allocator.held_gpu_keys()
    except AgentError:
        held = set()
    system = agent.system.read()
    gpus = [
        {
            "id": gpu.index,
            "temperature_c": gpu.temperature_c,
            "memory_total_mb": gpu.memory_total_mb,
            "memory_used_mb": gpu.memory_used_mb,
            "name": gpu.name,
            "uuid": gpu.uuid,
            "busy": gpu_key_held(gpu, held) or gpu.compute_processes,
            "usage_percent": gpu.usage_percent,
            "healthy": gpu.healthy,
        }
        for gpu in agent.gpus.snapshot()
    ]
    return {
        "node_id": agent.config.node_id,
        "cpu_usage_percent": system["cpu_usage_percent"],
        "memory_usage_percent": system["memory_usage_percent"],
        "gpus": gpus,
        "system": system,
    }


@blueprint.get("")
def get_metrics():
    return jsonify(node_metrics())
