"""The node: what it is (versions, CPUs, memory, NUMA, GPU topology) and the operator's drain."""

from __future__ import annotations

import os

import psutil
from flask import Blueprint, jsonify

from .. import __version__
from ..services import services
from ..errors import AgentError
from ..gpus import DriverFacts
from ..schemas import ReasonSchema
from ..system_metrics import numa_nodes
from .bodies import load_body

blueprint = Blueprint("node", __name__, url_prefix="/node")
_reason_schema = ReasonSchema()


@blueprint.get("")
def get_node():
    agent = services()
    inventory = agent.gpus.sampler.inventory
    driver = inventory.driver() if inventory is not None else DriverFacts()
    try:
        engine_version = agent.docker.engine_version()
    except AgentError:
        engine_version = None
    return jsonify({
        "agent_version": __version__,
        "node_id": agent.config.node_id,
        "gpu_backend": inventory.backend if inventory is not None else agent.config.gpu_backend,
        "driver_version": driver.driver_version,
        "cuda_driver_version": driver.cuda_driver_version,
        "nvml_version": driver.nvml_version,
        "nvml_hung": agent.gpus.sampler.hung(),
        "engine_version": engine_version,
        "cpu_count": os.cpu_count() or 0,
        "memory_total_mb": psutil.virtual_memory().total // (1024 * 1024),
        "numa_nodes": numa_nodes(),
        "gpus": [
            {
                "index": facts.index,
                "uuid": facts.uuid,
                "name": facts.name,
                "pci_bus_id": facts.pci_bus_id,
                "numa_node": facts.numa_node,
                "compute_capability": facts.compute_capability,
            }
            for facts in agent.gpus.facts()
        ],
        "topology": inventory.topology() if inventory is not None else [],
        "drain": agent.node.state(),
    })


@blueprint.post("/drain")
def drain_node():
    return jsonify(services().node.drain(load_body(_reason_schema)["reason"]))


@blueprint.delete("/drain")
def resume_node():
    return jsonify(services().node.resume())
