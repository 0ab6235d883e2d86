"""GPUs: their states, and the operator's quarantine."""

from __future__ import annotations

from flask import Blueprint

from ..errors import AllocationBusy, EngineError, EngineUnavailable, GpuHeld, GpuNotFound, InvalidRequest
from ..gpus.health import GpuView
from ..schemas import GpuPathSchema, GpuSchema, ReasonSchema
from ..services import services
from .events import REVISION_HEADER
from .operations import ENGINE_DOWN, Reply, Responds, Routes, fails

blueprint = Blueprint("gpus", __name__, url_prefix="/gpus")
routes = Routes(blueprint, tag="gpus", path=GpuPathSchema())
_gpu = GpuSchema()
NO_GPU = fails("No GPU with that UUID on this node.", GpuNotFound)
# Every GPU route asks the engine which containers hold GPUs.
ENGINE_FAILED = fails("The engine failed to list the containers that hold GPUs.", EngineError)
BUSY = fails("The allocation lock or the GPUs' state could not be had in time; retry after Retry-After seconds.", EngineUnavailable, AllocationBusy)


@routes.get("", "listGpus", summary="Every GPU with its state (free, allocated, releasing, quarantined, lost) and why",
            responds=Responds(200, "Every GPU, in index order.", GpuSchema(many=True)),
            failures=(ENGINE_FAILED, ENGINE_DOWN))
def list_gpus() -> Reply:
    """With the history's revision read first (X-Utopia-Revision): watching from it misses no change."""
    agent = services()
    revision = agent.events.history.revision()
    return Reply(agent.gpus.views(), 200, {REVISION_HEADER: str(revision)})


@routes.post("/<uuid>/quarantine", "quarantineGpu", summary="Quarantine a GPU: it is never given to a claim until released (a claim holding it keeps it)",
             body=ReasonSchema(),
             responds=Responds(200, "Quarantined.", _gpu),
             failures=(fails("The body is not JSON or has no valid `reason`; `errors` names the field.", InvalidRequest), NO_GPU, ENGINE_FAILED, BUSY))
def quarantine_gpu(uuid: str, body: dict) -> GpuView:
    return services().gpus.quarantine(uuid, body["reason"])


@routes.delete("/<uuid>/quarantine", "releaseGpu", summary="Release a GPU's quarantine, whatever put it there",
               responds=Responds(200, "Released (or was not quarantined).", _gpu),
               failures=(NO_GPU, fails("A claim still holds the GPU; the body names the claim.", GpuHeld), ENGINE_FAILED, BUSY))
def release_gpu(uuid: str) -> GpuView:
    return services().gpus.release(uuid)
