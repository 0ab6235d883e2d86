"""Node CPU, memory, disk, load and uptime from psutil, without ever sleeping in a request."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil

CPU_SAMPLE_SECONDS = 1.0


class SystemMetrics:
    """Reads the node's figures; CPU percent is the busy share since the previous sample.

    A sample younger than a second is reused, so a burst of polls does not turn the figure
    into noise over a few milliseconds, and no request waits for a measuring interval.
    """

    def __init__(self, disk_path: str = "/"):
        self._disk_path = disk_path
        self._lock = threading.Lock()
        self._cpu_percent = 0.0
        self._sampled_at = 0.0
        self._boot_time = psutil.boot_time()
        psutil.cpu_percent(interval=None)

    def cpu_percent(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._sampled_at >= CPU_SAMPLE_SECONDS:
                self._cpu_percent = psutil.cpu_percent(interval=None)
                self._sampled_at = now
            return self._cpu_percent

    def read(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        used = memory.total - memory.available
        return {
            "cpu_usage_percent": round(self.cpu_percent(), 1),
            "memory_usage_percent": round(100.0 * used / memory.total, 1),
            "memory_total_mb": memory.total // (1024 * 1024),
            "memory_used_mb": used // (1024 * 1024),
            "disk_usage_percent": round(psutil.disk_usage(self._disk_path).percent, 1),
            "load_average": round(os.getloadavg()[0], 2),
            "uptime": int(time.time() - self._boot_time),
        }
