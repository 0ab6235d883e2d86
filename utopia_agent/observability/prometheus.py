"""Prometheus exposition: dcgm-exporter's GPU series, node gauges and the agent's own figures.

Counters and histograms are written by every gunicorn worker into prometheus-client's
multiprocess directory (set by gunicorn.conf.py), so a scrape served by any worker adds up
all of them. Gauges of the node and its GPUs are read when scraped, by the worker that
serves the scrape, so they never go stale or get summed across workers.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..errors import AgentError
from ..claims.disks import GIB
from ..claims.holders import gpus_held_twice
from ..schemas import GPU_STATES

if TYPE_CHECKING:  # image pulls (under the docker manager) import this module, and gpu_health imports the docker manager
    from ..gpus.health import GpuView
    from ..gpus.sampler import GpuSample

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUEST_DURATION = Histogram(
    "utopia_agent_http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
CREATES = Counter(
    "utopia_agent_container_creates_total",
    "Container creates by outcome: created, or the error code that refused or failed it.",
    ["outcome"],
)
DELETES = Counter("utopia_agent_container_deletes_total", "Managed containers deleted through the agent.")
PULL_DURATION = Histogram(
    "utopia_agent_image_pull_duration_seconds",
    "Time image pulls took, by outcome: ok, refused (the registry refused: credentials, no such image), failed.",
    ["outcome"],
    buckets=(0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800),
)
IMAGES_COLLECTED = Counter("utopia_agent_images_collected_total", "Unused pulled images removed by image collection.")

# Set by each worker when it loads its certificate (server/tls_reload.py); the soonest of the live
# workers' is what a scrape shows, so a worker still on an old certificate is never hidden.
TLS_CERTIFICATE_EXPIRY = Gauge(
    "utopia_agent_tls_certificate_expiry_seconds",
    "When the certificate the agent serves HTTPS with expires (Unix seconds); absent on plain HTTP.",
    ["cert_file"],
    multiprocess_mode="livemin",
)


class NodeCollector(Collector):
    """Reads the node, its GPUs and the managed containers at scrape time."""

    def __init__(self, services):
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


def exposition(services) -> bytes:
    """The text exposition for one scrape: every worker's counters plus this scrape's gauges."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        for collector in (REQUEST_DURATION, CREATES, DELETES, PULL_DURATION, TLS_CERTIFICATE_EXPIRY, IMAGES_COLLECTED):
            registry.register(collector)
    registry.register(NodeCollector(services))
    return generate_latest(registry)
