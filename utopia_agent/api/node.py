"""The node: what it is (versions, CPUs, memory, NUMA, GPU topology) and the operator's drain."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil
from flask import Blueprint

from .. import __version__
from ..errors import AgentError, AllocationBusy, InvalidRequest
from ..gpus.inventory import DriverFacts, GpuFacts
from ..schemas import DrainSchema, NodeSchema, ReasonSchema
from ..services import services
from ..node.system_metrics import numa_nodes
from .events import REVISION_HEADER
from .operations import Reply, Responds, Routes, fails

blueprint = Blueprint("node", __name__, url_prefix="/node")
routes = Routes(blueprint, tag="node")
_drain = DrainSchema()
LOCK_BUSY = fails("The allocation lock could not be had in time; retry after Retry-After seconds.", AllocationBusy)


@dataclass(frozen=True)
class NodeDescription:
    agent_version: str
    node_id: str
    gpu_backend: str
    driver: DriverFacts
    nvml_hung: str | None
    engine_version: str | None
    cpu_count: int
    memory_total_mb: int
    numa_nodes: list[dict[str, Any]]
    gpus: list[GpuFacts]
    topology: list[list[str | None]]
    drain: dict[str, Any]
    network: dict[str, Any]
    claim_volume_backend: str
    disk: dict[str, Any] | None


@routes.get("", "getNode", summary="The node: versions, CPUs, memory, NUMA nodes, GPUs with their topology, drain state, the claims' network and disk",
            responds=Responds(200, "The node.", NodeSchema()))
def get_node() -> Reply:
    agent = services()
    revision = agent.events.history.revision()  # first: watching from it misses no drain
    inventory = agent.gpus.sampler.inventory
    try:
        engine_version = agent.docker.engine_version()
    except AgentError:
        engine_version = None
    return Reply(NodeDescription(
        agent_version=__version__,
        node_id=agent.config.node_id,
        gpu_backend=inventory.backend if inventory is not None else agent.config.gpu_backend,
        driver=inventory.driver() if inventory is not None else DriverFacts(),
        nvml_hung=agent.gpus.sampler.hung(),
        engine_version=engine_version,
        cpu_count=os.cpu_count() or 0,
        memory_total_mb=psutil.virtual_memory().total // (1024 * 1024),
        numa_nodes=numa_nodes(),
        gpus=agent.gpus.facts(),
        topology=inventory.topology() if inventory is not None else [],
        drain=agent.node.state(),
        network=agent.network.status(),
        claim_volume_backend=agent.volumes.store.backend,
        disk=_disk(agent),
    ), 200, {REVISION_HEADER: str(revision)})


def _disk(agent) -> dict[str, Any] | None:
    """The claims' disk, from the node view's claims; None while the engine cannot say where its data root is."""
    try:
        return agent.allocator.disk.describe(c.holdings for c in agent.docker.list_managed())
    except AgentError:
        return None


@routes.post("/drain", "drainNode", summary="Drain: creates get 409 node_draining with the reason; everything else works; kept across restarts",
             body=ReasonSchema(),
             responds=Responds(200, "Draining.", _drain),
             failures=(fails("The body is not JSON or has no valid `reason`; `errors` names the field.", InvalidRequest), LOCK_BUSY))
def drain_node(body: dict) -> dict[str, Any]:
    return services().node.drain(body["reason"])


@routes.delete("/drain", "resumeNode", summary="Resume taking claims", responds=Responds(200, "Taking claims.", _drain), failures=(LOCK_BUSY,))
def resume_node() -> dict[str, Any]:
    return services().node.resume()
