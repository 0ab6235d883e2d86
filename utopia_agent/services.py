"""What the routes call, made once per process by the application factory (`app.create_app`).

Routes import `services` from here, never from `app`, so the factory can import the routes
without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from .allocation.allocator import Allocator
from .allocation.claim_volumes import ClaimVolumes
from .node.claim_usage import ClaimUsage
from .disks.usage import DiskUsage
from .config import Config
from .engine.manager import DockerManager
from .gpus.health import GpuHealth
from .images.pulls import Images
from .allocation.janitor import Janitor
from .events.stream import EventStreams
from .exec.runner import Execs
from .node.disk_pressure import DiskPressure
from .node.drain import NodeDrain
from .network.isolation import NetworkIsolation
from .node.system_metrics import SystemMetrics


@dataclass
class Services:
    """What the routes call; made once per process (each gunicorn worker after its fork)."""

    config: Config
    docker: DockerManager
    gpus: GpuHealth
    node: NodeDrain
    allocator: Allocator
    system: SystemMetrics
    janitor: Janitor
    usage: ClaimUsage
    disks: DiskUsage
    network: NetworkIsolation
    images: Images
    events: EventStreams
    execs: Execs
    pressure: DiskPressure
    volumes: ClaimVolumes

    def close(self) -> None:
        self.events.close()
        self.execs.close()
        self.pressure.close()
        self.janitor.close()
        self.images.close()
        self.usage.close()
        self.disks.close()
        self.network.close()
        self.gpus.close()
        self.docker.close()


def services() -> Services:
    return current_app.extensions["utopia"]
