"""The application factory: configuration, per-process services, hooks and blueprints."""

from __future__ import annotations

from functools import partial

from flask import Flask

from .allocation.allocator import Allocator, allocation_lock
from .allocation.claim_volumes import ClaimVolumes
from .api.error_handlers import register_error_handlers
from .node.claim_usage import ClaimUsage
from .config import Config, load_config, prepare_state_dir
from .engine.connection import EngineConnection
from .engine.manager import DockerManager
from .events.history import EventHistory
from .events.stream import EventStreams
from .exec.runner import Execs
from .gpus.health import GpuHealth
from .gpus.sampler import GpuSampler
from .gpus.inventory import GpuInventory, make_inventory
from .allocation.janitor import Janitor
from .observability.logs import configure_logging
from .node.disk_pressure import DiskPressure
from .node.drain import NodeDrain
from .gpus.watchdog import NvmlWatchdog
from .observability.request_log import register_request_hooks
from .network.isolation import NetworkIsolation
from .images.collection import ImageCollector
from .images.pulls import Images
from .images.records import PulledImages
from .services import Services
from .disks.node_disk import NodeDisk
from .disks.usage import DiskUsage
from .node.state_dir import first_to_log
from .claims.resources import NodeResources
from .node.system_metrics import SystemMetrics
from .claims.volumes import MountPins
from .volumes.store import VolumeStore


def create_app(config: Config | None = None, gpus: GpuInventory | None = None, docker: DockerManager | None = None) -> Flask:
    """Build the agent; tests pass their own config, and may pass a GPU inventory and an engine
    (anything with DockerManager's interface, such as tests/support/memory_engine.MemoryEngine)."""
    config = config or load_config()
    configure_logging(config.log_format)
    prepare_state_dir(config)
    history = EventHistory(config.state_dir, config.events_history)
    docker = docker or DockerManager(config, history)
    docker.view.volunteer()  # one worker of the node watches the engine's events for all of them
    watchdog = NvmlWatchdog(config.nvml_timeout)
    sampler = GpuSampler(
        lambda: gpus or make_inventory(config.gpu_backend, config.fake_gpu_count, watchdog, partial(first_to_log, config)),
        watchdog,
        config.state_dir,
    )
    sampler.start(wait=config.nvml_timeout)
    lock_timeout = 3 * config.engine_timeout
    lock = partial(allocation_lock, config.state_dir, lock_timeout)
    health = GpuHealth(config.state_dir, sampler, docker, lock, config.gpu_release_seconds, history)
    node = NodeDrain(config.state_dir, lock, history)

    app = Flask("utopia_agent", static_folder=None)  # every route is declared (api/operations.py); no static files
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    images = _images(docker, config, lock)
    pressure = DiskPressure(config.state_dir, config.disk_pressure_percent, docker.data_root, history, images.collector.look).start()
    volume_store = VolumeStore(config.claim_volumes_root, config.claim_volume_backend)  # settled by the master (gunicorn.conf.py)
    allocator = Allocator(config, docker, health, node, lock, MountPins(config.mounts_dir), NodeResources.read(),
                          NodeDisk(config, docker, pressure=pressure), volume_store)
    # Volumes' sizes count against the node's allocatable disk, with the claims' disks (read afresh under the lock).
    allocator.disk.add_consumer("volumes", lambda: float(sum(volume.size_gb for volume in volume_store.list())))
    app.extensions["utopia"] = Services(
        config=config,
        docker=docker,
        gpus=health,
        node=node,
        allocator=allocator,
        system=SystemMetrics(),
        janitor=Janitor(allocator, config.state_dir / "janitor.stamp", config.unstarted_seconds).start(),
        usage=ClaimUsage(docker, config.state_dir).start(),
        # A claim past its disk is stopped at once, as kubelet evicts a pod past its ephemeral-storage limit (no grace: it would write on).
        disks=DiskUsage(docker, allocator.disk, config.state_dir, partial(allocator.stop, grace_seconds=0)).start(),
        network=NetworkIsolation(config, EngineConnection(config.engine_timeout)).start(),
        images=images,
        events=EventStreams(history, config.events_heartbeat_seconds),
        execs=Execs(config, docker, history),
        pressure=pressure,
        volumes=ClaimVolumes(volume_store, docker, lock, history, allocator.disk_ledger),
    )
    health.monitor.start()
    register_error_handlers(app)
    register_request_hooks(app)

    from .api import api_v1, health, openapi, prometheus

    app.register_blueprint(api_v1.blueprint)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(openapi.blueprint)
    app.register_blueprint(prometheus.blueprint)
    return app


def _images(docker: DockerManager, config: Config, lock) -> Images:
    pulled = PulledImages(config.state_dir, lock)
    return Images(docker, pulled, ImageCollector(docker, pulled, config), config.state_dir).start()
