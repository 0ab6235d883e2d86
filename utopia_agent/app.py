"""The application factory: configuration, per-process services, hooks and blueprints."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from .allocator import Allocator
from .api.error_handlers import register_error_handlers
from .config import Config, load_config, prepare_state_dir
from .docker_manager import DockerManager
from .gpus import GpuInventory, make_inventory
from .janitor import Janitor
from .logs import configure_logging
from .requests_log import register_request_hooks
from .system_metrics import SystemMetrics
from .volumes import MountPins


@dataclass
class Services:
    """What the routes call; made once per process (each gunicorn worker after its fork)."""

    config: Config
    docker: DockerManager
    gpus: GpuInventory
    allocator: Allocator
    system: SystemMetrics
    janitor: Janitor

    def close(self) -> None:
        self.janitor.close()
        self.gpus.close()
        self.docker.close()


def services() -> Services:
    return current_app.extensions["utopia"]


def create_app(config: Config | None = None, gpus: GpuInventory | None = None) -> Flask:
    """Build the agent; tests pass their own config (and may pass a GPU inventory)."""
    config = config or load_config()
    configure_logging(config.log_format)
    prepare_state_dir(config)
    docker = DockerManager(config)
    gpus = gpus or make_inventory(config.gpu_backend, config.fake_gpu_count)
    lock_timeout = 3 * config.engine_timeout

    app = Flask("utopia_agent")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    allocator = Allocator(config.state_dir, docker, gpus, lock_timeout, MountPins(config.mounts_dir))
    app.extensions["utopia"] = Services(
        config=config,
        docker=docker,
        gpus=gpus,
        allocator=allocator,
        system=SystemMetrics(),
        janitor=Janitor(allocator, config.state_dir / "janitor.stamp", config.unstarted_seconds).start(),
    )
    register_error_handlers(app)
    register_request_hooks(app)

    from .api import api_v1, health, openapi, prometheus

    app.register_blueprint(api_v1.blueprint)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(openapi.blueprint)
    app.register_blueprint(prometheus.blueprint)
    return app
