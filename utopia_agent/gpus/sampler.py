"""GPU figures for requests come from here: one worker of the node reads NVML in the background,
every worker's requests read its last sample.

Each worker opens its own inventory (nvmlInit and the static facts). The worker that holds the
sampler role (an flock on STATE_DIR/gpu-sample.lock) samples every GPU every
SAMPLE_INTERVAL_SECONDS and their memory-health counters every COUNTERS_INTERVAL_SECONDS, and
replaces STATE_DIR/gpu-sample.json with each sample; the others read that file, so NVML is read
once per node, not once per worker. When the sampling worker dies, another takes the role over
within an interval.

Every NVML call is timed by the watchdog: while one is overdue, `hung()` says why, the last good
sample is served and marked stale, and creates that need GPUs are refused (503). A worker that
does not sample counts NVML as hung once the node's sample is older than the NVML timeout and an
interval: the sampling worker is then stuck in a call (or gone without a successor).

A GPU is clean when it runs no compute process and uses no more memory than its idle level,
the least the sampler has seen it use without processes (so leftover memory that was there
before the agent started counts as idle until the GPU is once seen lower).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NvmlHung
from .inventory import GpuBackendError, GpuCounters, GpuInventory, GpuStatus
from ..node.role import NodeRole
from .watchdog import NvmlWatchdog
from ..node.state_dir import GPU_SAMPLE_FILE
from ..node.state_file import StateFile

log = logging.getLogger("utopia_agent.gpus")

SAMPLE_INTERVAL_SECONDS = 1.0
# How often a worker that waits for the node's first sample looks for it.
FIRST_SAMPLE_POLL_SECONDS = 0.05
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
    # When, on the clock every process of this boot shares: what staleness is judged by, so a step
    # of the wall clock never makes NVML look hung.
    monotonic_at: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        """Written every second: each record's fields are plain values, so a copy of its __dict__ does
        what dataclasses.asdict does (a deep copy, field by field) at a fortieth of the cost."""
        return {
            "gpus": [dict(vars(gpu)) for gpu in self.gpus],
            "counters": {str(index): dict(vars(counters)) for index, counters in self.counters.items()},
            "dirty": self.dirty,
            "taken_at": self.taken_at,
            "monotonic_at": self.monotonic_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuSample:
        return cls(
            gpus=tuple(GpuStatus(**gpu) for gpu in data["gpus"]),
            counters={int(index): GpuCounters(**counters) for index, counters in data["counters"].items()},
            dirty=data["dirty"],
            taken_at=data["taken_at"],
            monotonic_at=data["monotonic_at"],
        )


class SharedSample:
    """The node's last GPU sample, in a file that the sampling worker replaces whole (a reader never
    sees half of one and needs no lock). It is not synced to disk: a sample is worth a second.

    The file belongs to one run of the agent: the master removes it at start (state_dir.start_fresh).
    Readers keep the parsed sample until the file's inode or mtime changes. Unlike the small
    records of node/state_file.py, which are read afresh each time, a missed rewrite here costs at
    most one interval: the next sample comes a second later as another file."""

    def __init__(self, path: Path):
        self.path = path
        self._key: tuple[int, int] | None = None
        self._read: tuple[GpuSample, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def write(self, sample: GpuSample, idle_mb: dict[str, int]) -> None:
        StateFile(self.path).write({"idle_mb": idle_mb, **sample.to_json()}, durable=False)

    def read(self) -> tuple[GpuSample, dict[str, int]] | None:
        """The last sample with the idle memory levels it was judged by; None before the first."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns)
        with self._lock:
            if key != self._key:
                self._key, self._read = key, self._parse()
            return self._read

    def _parse(self) -> tuple[GpuSample, dict[str, int]] | None:
        try:
            data = json.loads(self.path.read_bytes())
            return GpuSample.from_json(data), data["idle_mb"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.error("GPU sample %s does not parse (%s); waiting for the next", self.path, exc)
            return None


class GpuSampler:
    """Owns this worker's inventory, and the thread that samples it while this worker holds the role."""

    def __init__(self, open_inventory: Callable[[], GpuInventory], watchdog: NvmlWatchdog, state_dir: Path):
        self._open_inventory = open_inventory
        self.watchdog = watchdog
        self._role = NodeRole(state_dir / "gpu-sample.lock")
        self._shared = SharedSample(state_dir / GPU_SAMPLE_FILE)
        self._started = time.monotonic()
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
        """The node's last good sample (None before the first)."""
        if self._role.held and self._sample is not None:
            return self._sample
        shared = self._shared.read()  # also what a worker that just took the role over serves until it samples
        return shared[0] if shared else None

    def hung(self) -> str | None:
        """Why NVML counts as hung: a call of this worker's is overdue, or the node's sample is (the
        sampling worker is stuck in a call, or its reads keep failing)."""
        reason = self.watchdog.hung()
        if reason is not None:
            return reason
        sample = self.latest()
        limit = self.watchdog.timeout + SAMPLE_INTERVAL_SECONDS
        if sample is not None and (age := time.monotonic() - sample.monotonic_at) > limit:
            return f"NVML is hung: the node's GPU sample has not been renewed for {age:.1f} s"
        if sample is None and (waited := time.monotonic() - self._started) > limit:
            return f"NVML is hung: no GPU sample in the {waited:.1f} s since this worker started"
        return None

    def for_allocation(self) -> GpuSample:
        """The sample an allocation decides on; NvmlHung while NVML is hung or not read yet."""
        reason = self.hung()
        if reason is not None:
            raise NvmlHung(f"GPUs cannot be allocated: {reason}")
        sample = self.latest()
        if sample is None:
            raise NvmlHung("GPUs cannot be allocated: NVML has not been read yet")
        return sample

    def close(self) -> None:
        """Stop sampling; the thread shuts NVML down on its way out (unless a call is hung)."""
        self._closed.set()
        self._wake.set()
        if self._role.held or not self._opened.is_set():  # else it sleeps in flock, with nothing to shut down
            self._thread.join(timeout=self.watchdog.timeout)

    def _run(self) -> None:
        try:
            self.inventory = self._open_inventory()
        except GpuBackendError as error:
            self._open_error = error
            self._opened.set()
            return
        unshared: OSError | None = None
        try:
            while not self._closed.is_set():
                # Once the node's first sample is there, a worker that does not sample sleeps in
                # the kernel until the role is free (the sampling worker died or stopped).
                if self._role.held or self._take_role(block=self._opened.is_set()):
                    if self._closed.is_set():
                        break
                    try:
                        sample = self._read(self.inventory)
                        self._shared.write(sample, self._idle_mb)
                        self._sample = sample  # only once every worker can serve it too
                        unshared = None
                    except OSError as error:  # the state dir is full: the next sample tries again
                        if unshared is None:
                            log.warning("GPU sample not shared: %s", error.strerror or error)
                        unshared = error
                    except Exception:  # a bug in one read must not stop the sampling for good
                        log.exception("GPU sample failed")
                    self._opened.set()
                    self._wake.wait(SAMPLE_INTERVAL_SECONDS)
                elif self._shared.read() is not None:
                    self._opened.set()
                else:
                    self._wake.wait(FIRST_SAMPLE_POLL_SECONDS)
        finally:
            self._role.release()
            self.inventory.close()

    def _take_role(self, block: bool) -> bool:
        """Become the node's sampler when no worker is; carry on from the last sample's idle levels."""
        if not self._role.take(block):
            return False
        shared = self._shared.read()
        if shared is not None:
            self._idle_mb = dict(shared[1])
        log.info("this worker samples the node's GPUs (pid %d)", os.getpid())
        return True

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
