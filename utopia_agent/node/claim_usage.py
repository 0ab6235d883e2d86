"""What each claim's container uses, read from the kernel's cgroup files (v1 or v2), never from
the engine's stats stream (which measures for a second per call).

A background sampler reads every running claim every SAMPLE_SECONDS into one file in the state
dir; every worker runs one, and the one holding the node's role (see role.py) samples for
the whole node, so whichever worker serves a scrape serves the same figures, and CPU seconds
never go backwards.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from .chore import NodeSampler
from .mountinfo import mountinfo_fields

log = logging.getLogger("utopia_agent.usage")

# Prometheus scrapes every 15 s or more: a sample every 10 s serves each scrape a fresh figure, and
# at 100 claims costs about 0.08% of a core instead of 0.17% every 5 s.
SAMPLE_SECONDS = 10.0
# A v1 memory limit this large is "no limit" (the kernel's PAGE_COUNTER_MAX in bytes, page-rounded).
_V1_UNLIMITED = 1 << 62
# cpu_percent is measured over at least this long; a sample younger than it is too close to now.
_MIN_SPAN_SECONDS = 1.0


@dataclass(frozen=True)
class Usage:
    """One reading of a container's cgroup."""

    cpu_seconds: float
    memory_used_bytes: int
    memory_limit_bytes: int | None


def _cgroup_mounts(mountinfo: str) -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """v1 controller -> (mount root, mount point), and the v2 (root, mount point), from /proc/self/mountinfo."""
    v1: dict[str, tuple[str, str]] = {}
    v2 = None
    for fields, separator in mountinfo_fields(mountinfo):
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        root, point = fields[3], fields[4]
        if fstype == "cgroup2":
            v2 = (root, point)
        elif fstype == "cgroup":
            for option in options:
                v1.setdefault(option, (root, point))
    return v1, v2


def _join(mount: tuple[str, str], path: str) -> Path:
    root, point = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return Path(point) / path.lstrip("/")


@dataclass(frozen=True)
class CgroupFiles:
    """Where one process's CPU and memory accounting lives, v1 or v2."""

    cpu_dir: Path
    cpu_v1: bool
    memory_dir: Path
    memory_v1: bool

    @classmethod
    def of_pid(cls, pid: int, mountinfo: str | None = None) -> CgroupFiles | None:
        """From /proc/<pid>/cgroup; None when the process is gone or no hierarchy has the controllers."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
        v1_mounts, v2_mount = _cgroup_mounts(mountinfo)
        v1_paths: dict[str, str] = {}
        v2_path = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers:
                v1_paths.update(dict.fromkeys(controllers.split(","), path))
            else:
                v2_path = path
        cpu = cls._place("cpuacct", v1_paths, v1_mounts, v2_path, v2_mount)
        memory = cls._place("memory", v1_paths, v1_mounts, v2_path, v2_mount)
        if cpu is None or memory is None:
            return None
        return cls(cpu[0], cpu[1], memory[0], memory[1])

    @staticmethod
    def _place(controller, v1_paths, v1_mounts, v2_path, v2_mount) -> tuple[Path, bool] | None:
        if controller in v1_paths and controller in v1_mounts:
            return _join(v1_mounts[controller], v1_paths[controller]), True
        if v2_path is not None and v2_mount is not None:
            return _join(v2_mount, v2_path), False
        return None

    @cached_property
    def _files(self) -> tuple[str, str, str, str]:
        """CPU time, memory.stat, memory used and memory limit: the paths joined once, not at each
        sample (pathlib's joining cost as much as the reads)."""
        cpu = "cpuacct.usage" if self.cpu_v1 else "cpu.stat"
        used, limit = ("memory.usage_in_bytes", "memory.limit_in_bytes") if self.memory_v1 else ("memory.current", "memory.max")
        return str(self.cpu_dir / cpu), str(self.memory_dir / "memory.stat"), str(self.memory_dir / used), str(self.memory_dir / limit)

    def read(self) -> Usage | None:
        """CPU time and memory now; None when the cgroup is gone (the container stopped).

        The sampler reads every running claim every few seconds, so each file is read with one
        open and one read, and memory.stat is searched for the one figure it gives."""
        cpu_file, stat_file, used_file, limit_file = self._files
        try:
            cpu = _read(cpu_file)
            cpu_seconds = int(cpu) / 1e9 if self.cpu_v1 else _stat_value(cpu, b"usage_usec") / 1e6
            inactive = _stat_value(_read(stat_file), b"total_inactive_file" if self.memory_v1 else b"inactive_file", default=0)
            used = int(_read(used_file))
            limit_text = _read(limit_file).strip()
            limit = None if limit_text == b"max" else int(limit_text)
        except (OSError, ValueError, KeyError):
            return None
        if limit is not None and limit >= _V1_UNLIMITED:  # v1 says "no limit" with a huge number
            limit = None
        # As `docker stats` does: page cache the kernel can drop is not what the job uses.
        return Usage(cpu_seconds, max(0, used - inactive), limit)


@dataclass(frozen=True)
class _NamedCgroups:
    """Where the engine puts a container's cgroups, as the paths around its id."""

    cpu: tuple[str, str]
    cpu_v1: bool
    memory: tuple[str, str]
    memory_v1: bool

    @classmethod
    def learnt(cls, container_id: str, files: CgroupFiles) -> _NamedCgroups | None:
        """From one container's cgroups; None when their paths do not name it exactly once."""
        cpu, memory = str(files.cpu_dir).split(container_id), str(files.memory_dir).split(container_id)
        if len(cpu) != 2 or len(memory) != 2:
            return None
        return cls((cpu[0], cpu[1]), files.cpu_v1, (memory[0], memory[1]), files.memory_v1)

    def of(self, container_id: str) -> CgroupFiles | None:
        """The container's cgroups where they exist (it runs, under the same driver and parent)."""
        cpu_dir, memory_dir = Path(container_id.join(self.cpu)), Path(container_id.join(self.memory))
        if not (cpu_dir.is_dir() and memory_dir.is_dir()):
            return None
        return CgroupFiles(cpu_dir, self.cpu_v1, memory_dir, self.memory_v1)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _stat_value(stats: bytes, key: bytes, default: int | None = None) -> int:
    """The value of `key` in a cgroup stat file ("key value" lines); KeyError when absent without a default."""
    found = _stat_line(key).search(stats)
    if found is not None:
        return int(found.group(1))
    if default is None:
        raise KeyError(key)
    return default


@cache
def _stat_line(key: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"^" + re.escape(key) + rb" (-?\d+)$", re.MULTILINE)


class ClaimUsage(NodeSampler):
    """Samples the running claims in the background and answers per-claim figures from the samples."""

    def __init__(self, docker, state_dir: Path, interval: float = SAMPLE_SECONDS):
        # One worker samples for the node, so each container's cgroup is looked up (one inspect) once.
        super().__init__("claim-usage", state_dir, interval / 2, log, "claim usage not sampled: %s")
        self._docker = docker
        self._interval = interval
        self._cgroups: dict[str, CgroupFiles] = {}
        self._named: _NamedCgroups | None = None
        self._cgroups_lock = threading.Lock()

    # --- reading ---------------------------------------------------------------------

    def now(self, container_id: str, started: int) -> tuple[Usage | None, float]:
        """The container's usage now and its CPU percent (of one CPU) since the last sample at least a
        second old, or since it started when no sample is; (None, 0.0) when it is not running."""
        cgroup = self._cgroup(container_id)
        usage = cgroup.read() if cgroup else None
        if usage is None:  # stopped or gone: a worker that does not sample forgets it here
            with self._cgroups_lock:
                self._cgroups.pop(container_id, None)
            return None, 0.0
        now = time.time()
        entry = self.samples().get("claims", {}).get(container_id, {})
        spans = [(entry.get("time", 0.0), entry.get("cpu_seconds")), tuple(entry.get("previous") or (0.0, None))]
        for then, cpu_then in spans:
            if cpu_then is not None and now - then >= _MIN_SPAN_SECONDS and usage.cpu_seconds >= cpu_then:
                return usage, round(100.0 * (usage.cpu_seconds - cpu_then) / (now - then), 1)
        if started and now - started >= _MIN_SPAN_SECONDS:
            return usage, round(100.0 * usage.cpu_seconds / (now - started), 1)
        return usage, 0.0

    def _cgroup(self, container_id: str) -> CgroupFiles | None:
        """Found once per container. The engine names the cgroup after the container, so the place
        holds across restarts, and once one container's place is known through its main process
        (one inspect), another's is the same path with its id: a burst of new claims costs no
        inspect each (one still settles where that path does not exist: the cgroup driver or parent
        differs, or the container does not run)."""
        with self._cgroups_lock:
            known, named = self._cgroups.get(container_id), self._named
        if known is not None:
            return known
        found = named.of(container_id) if named is not None else None
        if found is None:
            pid = self._docker.container_pid(container_id)
            found = CgroupFiles.of_pid(pid) if pid else None
        if found is not None:
            with self._cgroups_lock:
                self._cgroups[container_id] = found
                if named is None:
                    self._named = _NamedCgroups.learnt(container_id, found)
        return found

    # --- sampling --------------------------------------------------------------------

    def _sample_round(self) -> bool:
        return self.sample_if_due()

    def sample_if_due(self) -> bool:
        """Sample every running claim when this worker samples for the node and the interval has
        passed since the last sample (an earlier holder's included); True when it did."""
        if not self._role.take():
            return False
        previous = self.samples()
        if time.time() - previous.get("time", 0.0) < self._interval * 0.9:
            return False
        self._samples.write(self._sample(previous))
        return True

    def _sample(self, previous: dict) -> dict:
        running = [c for c in self._docker.list_managed() if c.status == "running"]
        now = time.time()
        claims = {}
        for container in running:
            cgroup = self._cgroup(container.id)
            usage = cgroup.read() if cgroup else None
            if usage is None:
                continue
            before = previous.get("claims", {}).get(container.id)
            claims[container.id] = {
                "claim_id": container.claim_id,
                "time": now,
                "cpu_seconds": usage.cpu_seconds,
                "memory_used_bytes": usage.memory_used_bytes,
                "memory_limit_bytes": usage.memory_limit_bytes,
                "previous": [before["time"], before["cpu_seconds"]] if before else None,
            }
        with self._cgroups_lock:
            for gone in set(self._cgroups) - {c.id for c in running}:
                del self._cgroups[gone]
        return {"time": now, "claims": claims}
