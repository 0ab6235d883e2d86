"""Node CPU, memory, disk, load and uptime from psutil, without ever sleeping in a request; NUMA nodes from sysfs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
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


def numa_nodes(root: Path = Path("/sys/devices/system/node")) -> list[dict[str, Any]]:
    """The node's NUMA nodes with their CPUs and memory, from sysfs; [] where the kernel has none."""
    nodes = []
    for path in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _cpu_list((path / "cpulist").read_text())
        except OSError:
            continue
        nodes.append({"id": int(path.name[4:]), "cpus": cpus, "memory_total_mb": _node_memory_mb(path / "meminfo")})
    return nodes


def _cpu_list(text: str) -> list[int]:
    """'0-3,8-11' -> [0, 1, 2, 3, 8, 9, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _node_memory_mb(meminfo: Path) -> int | None:
    """MemTotal of one NUMA node ('Node 0 MemTotal:  32768 kB'), in MiB."""
    try:
        for line in meminfo.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "MemTotal:":
                return int(fields[3]) // 1024
    except (OSError, ValueError):
        pass
    return None
