"""GPU figures for requests come from here: a background thread per worker reads NVML, requests
read its last sample.

The thread opens the inventory (nvmlInit and the static facts), then samples every GPU every
SAMPLE_INTERVAL_SECONDS and their memory-health counters every COUNTERS_INTERVAL_SECONDS.
Every NVML call is timed by the watchdog: while one is overdue, `hung()` says why, the last
good sample is served and marked stale, and creates that need GPUs are refused (503).

A GPU is clean when it runs no compute process and uses no more memory than its idle level,
the least this worker has seen it use without processes (so leftover memory that was there
before the agent started counts as idle until the GPU is once seen lower).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import NvmlHung
from .gpus import GpuBackendError, GpuCounters, GpuInventory, GpuStatus
from .nvml_watchdog import NvmlWatchdog

log = logging.getLogger("utopia_agent.gpus")

SAMPLE_INTERVAL_SECONDS = 1.0
COUNTERS_INTERVAL_SECONDS = 5.0
# A GPU without compute processes is clean when its used memory is within this of the least
# it was seen using without any (its idle level: the driver's own use, which v1 counts too).
IDLE_MEMORY_SLACK_MB = 256


@dataclass(frozen=True)
class GpuSample:
    """Every GPU at one moment, with the latest counters and which GPUs are not clean."""

    gpus: tuple[GpuStatus, ...]
    counters: dict[int, GpuCounters]
    # UUID -> why the GPU is not clean (compute processes, or memory above its idle level).
    dirty: dict[str, str]
    taken_at: float = field(default_factory=time.time)


class GpuSampler:
    """Owns this worker's inventory and the thread that reads it."""

    def __init__(self, open_inventory: Callable[[], GpuInventory], watchdog: NvmlWatchdog):
        self._open_inventory = open_inventory
        self.watchdog = watchdog
        self.inventory: GpuInventory | None = None
        self._sample: GpuSample | None = None
        self._counters: dict[int, GpuCounters] = {}
        self._counters_at = float("-inf")
        self._idle_mb: dict[str, int] = {}
        self._opened = threading.Event()
        self._open_error: GpuBackendError | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self, wait: float) -> GpuSampler:
        """Start sampling; wait up to `wait` seconds for the inventory to open and the first sample.

        An inventory that fails to open raises its GpuBackendError here (the worker must not
        start); one still opening after `wait` (NVML hung at nvmlInit) lets the worker serve,
        with /health saying why."""
        self._thread.start()
        if self._opened.wait(wait) and self._open_error is not None:
            raise self._open_error
        if not self._opened.is_set():
            log.error("NVML did not open within %g s; serving with NVML hung until it does", wait)
        return self

    def latest(self) -> GpuSample | None:
        """The last good sample (None before the first)."""
        return self._sample

    def hung(self) -> str | None:
        return self.watchdog.hung()

    def for_allocation(self) -> GpuSample:
        """The sample an allocation decides on; NvmlHung while NVML is hung or not read yet."""
        reason = self.hung()
        if reason is not None:
            raise NvmlHung(f"GPUs cannot be allocated: {reason}")
        sample = self._sample
        if sample is None:
            raise NvmlHung("GPUs cannot be allocated: NVML has not been read yet")
        return sample

    def close(self) -> None:
        """Stop sampling; the thread shuts NVML down on its way out (unless a call is hung)."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.watchdog.timeout)

    def _run(self) -> None:
        try:
            self.inventory = self._open_inventory()
        except GpuBackendError as error:
            self._open_error = error
            self._opened.set()
            return
        try:
            while not self._closed.is_set():
                try:
                    self._sample = self._read(self.inventory)
                except Exception:  # a bug in one read must not stop the sampling for good
                    log.exception("GPU sample failed")
                self._opened.set()
                self._wake.wait(SAMPLE_INTERVAL_SECONDS)
        finally:
            self.inventory.close()

    def _read(self, inventory: GpuInventory) -> GpuSample:
        gpus = tuple(inventory.snapshot())
        now = time.monotonic()
        if now - self._counters_at >= COUNTERS_INTERVAL_SECONDS:
            self._counters = inventory.counters()
            self._counters_at = now
        return GpuSample(gpus, self._counters, {gpu.uuid: why for gpu in gpus if gpu.uuid and (why := self._dirt(gpu))})

    def _dirt(self, gpu: GpuStatus) -> str | None:
        """Why the GPU is not clean, or None: no compute process and memory near its idle level."""
        if gpu.compute_processes:
            return "compute processes are running"
        if gpu.memory_used_mb is None:
            return None
        idle = min(self._idle_mb.get(gpu.uuid, gpu.memory_used_mb), gpu.memory_used_mb)
        self._idle_mb[gpu.uuid] = idle
        if gpu.memory_used_mb > idle + IDLE_MEMORY_SLACK_MB:
            return f"{gpu.memory_used_mb - idle} MiB of memory still in use"
        return None
