"""GET /metrics: Prometheus text exposition; auth per UTOPIA_AGENT_PROMETHEUS_AUTH.

dcgm-exporter's GPU series, node gauges and the agent's own figures. Counters and histograms
come summed from every worker (observability/prometheus.py); gauges of the node and its GPUs are
read when scraped, by the worker that serves the scrape, so they never go stale or get summed
across workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..claims.disks import GIB
from ..claims.holders import gpus_held_twice
from ..errors import AgentError
from ..gpus.health import GpuView
from ..gpus.sampler import GpuSample
from ..node.disk_pressure import DiskPressure
from ..observability.prometheus import INSTRUMENTS, MULTIPROC_ENV
from ..schemas import GPU_STATES
from ..services import Services, services
from .auth import require_token
from .operations import Responds, Routes

blueprint = Blueprint("prometheus", __name__)
routes = Routes(blueprint, tag="node")


@routes.get("/metrics", "getPrometheusMetrics", summary="Prometheus text exposition: dcgm-exporter's GPU series and utopia_agent_* series",
            description="Needs the bearer token (or the read-only one) unless UTOPIA_AGENT_PROMETHEUS_AUTH=none.",
            security=({"bearer": []}, {}),
            responds=Responds(200, "The exposition.", content_type="text/plain"))
def prometheus_metrics():
    agent = services()
    if agent.config.prometheus_auth == "token":
        require_token(agent.config)
    return Response(exposition(agent), mimetype=CONTENT_TYPE_LATEST)


class NodeCollector(Collector):
    """Reads the node, its GPUs and the managed containers at scrape time."""

    def __init__(self, services: Services):
        self._services = services

    def collect(self) -> Iterable:
        agent = self._services
        hostname = agent.config.node_id
        try:
            containers = agent.docker.list_managed()
            engine_up = 1.0
        except AgentError:
            containers, engine_up = None, 0.0
        yield GaugeMetricFamily("utopia_agent_engine_up", "1 when the Docker engine answered this scrape.", value=engine_up)

        sample = agent.gpus.sampler.latest()
        holdings = [container.holdings for container in containers or ()]
        views = agent.gpus.views(agent.gpus.listed_holders(containers) if containers is not None else {}, sample)
        yield from self._dcgm_families(views, sample, agent.gpus.records.read().get("xid_events", {}), hostname)
        states = GaugeMetricFamily("utopia_agent_gpus", "GPUs by state; only free ones are given to claims.", labels=["state"])
        for state in GPU_STATES:
            states.add_metric([state], sum(1 for view in views if view.state == state))
        yield states
        yield from self._claim_families(agent.usage.samples())
        yield from self._claim_disk_families(agent.disks.samples())
        yield GaugeMetricFamily(
            "utopia_agent_gpus_allocated_twice",
            "GPUs that more than one managed container claims (should always be 0).",
            value=len(gpus_held_twice(holdings)),
        )
        yield GaugeMetricFamily(
            "utopia_agent_nvml_hung",
            "1 while an NVML call has not returned within UTOPIA_AGENT_NVML_TIMEOUT (GPU figures are then stale).",
            value=1.0 if agent.gpus.sampler.hung() is not None else 0.0,
        )
        if sample is not None:
            yield GaugeMetricFamily("utopia_agent_gpu_sample_age_seconds", "Age of the GPU figures in this scrape.",
                                    value=max(0.0, time.time() - sample.taken_at))
        network = agent.network.status()
        if network.get("isolation") == "on":
            yield GaugeMetricFamily(
                "utopia_agent_network_isolation_ok",
                "1 while the claims' network isolation is in place (firewall rules and network); 0: creates are refused.",
                value=0.0 if agent.network.problem() else 1.0,
            )
            yield GaugeMetricFamily("utopia_agent_network_unprotected_claims",
                                    "Claims on the engine's default bridge, made before isolation was on: not isolated.",
                                    value=len(network.get("unprotected_claims") or ()))
        yield from self._image_families(agent.images.collector.status_file.read())
        yield from self._disk_families(agent, holdings if containers is not None else None)
        yield GaugeMetricFamily("utopia_agent_node_draining", "1 while the operator drains the node (creates are refused).",
            value=1.0 if agent.node.state()["draining"] else 0.0)
        yield from self._pressure_families(agent.pressure)

        if containers is not None:
            by_state = GaugeMetricFamily("utopia_agent_containers", "Managed containers by Docker state.", labels=["state"])
            counts: dict[str, int] = {}
            for container in containers:
                counts[container.status] = counts.get(container.status, 0) + 1
            for state in ("created", "running", "paused", "restarting", "removing", "exited", "dead"):
                by_state.add_metric([state], counts.get(state, 0))
            yield by_state

        system = agent.system.read()
        for key, help_text in (
            ("cpu_usage_percent", "Node CPU busy share since the previous sample."),
            ("memory_usage_percent", "Node memory in use."),
            ("disk_usage_percent", "Root filesystem in use."),
            ("load_average", "Node 1-minute load average."),
            ("uptime", "Node uptime in seconds."),
        ):
            yield GaugeMetricFamily(f"utopia_agent_node_{key}", help_text, value=system[key])

    @staticmethod
    def _disk_families(agent, holdings: list | None) -> Iterable:
        """The quota mode in force, and the claims' disk: allocatable, allocated (with the engine
        up), and used on the data root's filesystem; none of it while the engine cannot say."""
        disk = agent.allocator.disk
        try:
            mode = disk.quota().mode
            size, free = disk.filesystem_bytes()
            allocatable = disk.allocatable_gb()
            ledger = disk.ledger(holdings) if holdings is not None else None
        except AgentError:
            return
        modes = GaugeMetricFamily("utopia_agent_disk_quota_mode", "1 for the way claims' container disks are enforced now "
                                  "(UTOPIA_AGENT_DISK_QUOTA as the engine allows it).", labels=["mode"])
        for name in ("engine", "measured", "off"):
            modes.add_metric([name], 1.0 if name == mode else 0.0)
        yield modes
        yield GaugeMetricFamily("utopia_agent_disk_allocatable_bytes", "The engine's data-root filesystem less UTOPIA_AGENT_RESERVED_DISK_GB.",
                                value=allocatable * GIB)
        yield GaugeMetricFamily("utopia_agent_disk_used_bytes", "Bytes in use on the engine's data-root filesystem.", value=size - free)
        if ledger is not None:
            yield GaugeMetricFamily("utopia_agent_disk_allocated_bytes", "Container disks (and claim volumes) given out of the allocatable disk.",
                                    value=ledger.allocated_gb * GIB)

    @staticmethod
    def _pressure_families(pressure: DiskPressure) -> Iterable:
        """The engine's data root's filesystem and the state dir's (`filesystem`: data_root, state_dir), as creates judge them."""
        pressed = {fs.name for fs in pressure.pressed()}
        flags = GaugeMetricFamily("utopia_agent_disk_pressure",
                                  "1 while the filesystem has less free space than UTOPIA_AGENT_DISK_PRESSURE_PERCENT: creates answer 507.",
                                  labels=["filesystem"])
        free = GaugeMetricFamily("utopia_agent_disk_free_percent", "Share of the filesystem free for use.", labels=["filesystem"])
        for fs in pressure.filesystems():
            flags.add_metric([fs.name], 1.0 if fs.name in pressed else 0.0)
            free.add_metric([fs.name], fs.free_percent)
        return flags, free

    @staticmethod
    def _image_families(status: dict) -> Iterable:
        """The image store as image collection's last look found it (no engine call per scrape);
        before the first look only the over-the-mark flag, at 0."""
        yield GaugeMetricFamily("utopia_agent_image_store_over_high_mark",
                                "1 when image collection could not get usage under UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT.",
                                value=1.0 if status.get("over_high") else 0.0)
        if not status:
            return
        yield GaugeMetricFamily("utopia_agent_images", "Images the engine holds.", value=status["images"])
        yield GaugeMetricFamily("utopia_agent_images_bytes", "Bytes of the images the engine holds.", value=status["bytes"])
        yield GaugeMetricFamily("utopia_agent_image_store_usage_percent", "Share of the engine's image filesystem in use.",
                                value=status["usage_percent"])

    @staticmethod
    def _claim_disk_families(samples: dict) -> Iterable:
        """Each running claim's writable layer as last measured, and its container disk (never walked per scrape)."""
        used = GaugeMetricFamily("utopia_agent_claim_disk_used_bytes", "What the claim's writable layer takes on disk, as last measured.",
                                 labels=["claim_id"])
        limit = GaugeMetricFamily("utopia_agent_claim_disk_limit_bytes", "The claim's container disk (disk_gb).", labels=["claim_id"])
        for entry in samples.get("claims", {}).values():
            used.add_metric([entry["claim_id"]], entry["used_bytes"])
            if entry.get("limit_bytes") is not None:
                limit.add_metric([entry["claim_id"]], entry["limit_bytes"])
        return used, limit

    @staticmethod
    def _claim_families(samples: dict) -> Iterable:
        """Each running claim's CPU time and memory, from the background sample (never read per scrape)."""
        cpu = CounterMetricFamily("utopia_agent_claim_cpu_seconds", "CPU time the claim's container used.", labels=["claim_id"])
        used = GaugeMetricFamily("utopia_agent_claim_memory_used_bytes", "Memory the claim's container uses, without reclaimable page cache.",
            labels=["claim_id"])
        limit = GaugeMetricFamily("utopia_agent_claim_memory_limit_bytes", "The claim's memory limit (no sample: no limit).", labels=["claim_id"])
        for entry in samples.get("claims", {}).values():
            claim = [entry["claim_id"]]
            cpu.add_metric(claim, entry["cpu_seconds"])
            used.add_metric(claim, entry["memory_used_bytes"])
            if entry.get("memory_limit_bytes") is not None:
                limit.add_metric(claim, entry["memory_limit_bytes"])
        return cpu, used, limit

    @staticmethod
    def _dcgm_families(views: list[GpuView], sample: GpuSample | None, xid_events: dict, hostname: str) -> Iterable[GaugeMetricFamily]:
        """The gauges under dcgm-exporter's names and labels, so its dashboards and alerts work unchanged,
        plus `claim_id` (empty for a GPU no claim holds), as dcgm-exporter adds the pod that holds a GPU."""
        labels = ["gpu", "UUID", "modelName", "Hostname", "claim_id"]
        families = {
            "temp": GaugeMetricFamily("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", labels=labels),
            "used": GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=labels),
            "free": GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=labels),
            "util": GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=labels),
            "xid": GaugeMetricFamily("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", labels=labels),
            "ecc_dbe_volatile": GaugeMetricFamily("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", labels=labels),
            "retired_pages_pending": GaugeMetricFamily("DCGM_FI_DEV_RETIRED_PENDING", "Whether pages are pending retirement (1) or not (0).", labels=labels),
            "rows_correctable": GaugeMetricFamily("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.", labels=labels),
            "rows_uncorrectable": GaugeMetricFamily("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.",
                labels=labels),
            "row_remap_pending": GaugeMetricFamily("DCGM_FI_DEV_ROW_REMAP_PENDING", "Whether a row remapping is pending (1) or not (0).", labels=labels),
            "row_remap_failure": GaugeMetricFamily("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.", labels=labels),
        }
        for view in views:
            gpu = view.status
            values = [str(gpu.index), gpu.uuid or "", gpu.name or "", hostname, view.claim_id or ""]
            counters = sample.counters.get(gpu.index) if sample is not None else None
            readings = {
                "temp": gpu.temperature_c,
                "used": gpu.memory_used_mb,
                "free": None if gpu.memory_total_mb is None or gpu.memory_used_mb is None else gpu.memory_total_mb - gpu.memory_used_mb,
                "util": gpu.usage_percent,
                "xid": (xid_events.get(gpu.uuid) or [{"code": 0}])[-1]["code"] if gpu.uuid else None,
                **(asdict(counters) if counters is not None else {}),
            }
            for key, value in readings.items():
                if value is not None:
                    families[key].add_metric(values, value)
        return families.values()


def exposition(services: Services) -> bytes:
    """The text exposition for one scrape: every worker's counters plus this scrape's gauges."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        for collector in INSTRUMENTS:
            registry.register(collector)
    registry.register(NodeCollector(services))
    return generate_latest(registry)
