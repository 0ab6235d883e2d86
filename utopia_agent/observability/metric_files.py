"""prometheus-client's multiprocess files, made safe on a full filesystem.

The library sizes a new or growing file with truncate, which leaves a hole, and stores through
a map of it: a store into a hole of a full filesystem is SIGBUS, which kills the worker (a
worker started in its place dies the same way). Here every block of the file is allocated
before the map may store to it, so a full filesystem is ENOSPC at a moment it can be handled:
a new series that finds no room is kept in this process's memory, missing from scrapes, and
goes to the file at its next write once there is room again.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict, _pack_two_doubles, _unpack_two_doubles

from ..errors import NO_SPACE

log = logging.getLogger("utopia_agent.metrics")


class AllocatedMmapedDict(MmapedDict):
    def __init__(self, filename: str, read_mode: bool = False):
        self._spilled: dict[str, tuple[float, float]] = {}
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, _INITIAL_MMAP_SIZE))
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                # No file for this process: its series of this kind live in memory, out of scrapes,
                # until the worker is replaced. Rare: a worker's files are made at its first request.
                # An empty file would break every scrape (the library reads its first word): it goes.
                if os.fstat(fd).st_size == 0:
                    os.unlink(filename)
                log.warning("metrics file %s cannot be made (%s): this worker's series of its kind stay in memory", filename, exc.strerror)
                self._f, self._fname, self._positions, self._capacity, self._used = None, filename, {}, 0, 0
                return
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        """As the library's, after allocating the blocks a growth needs; without room the key stays out of the file."""
        if self._f is None:
            self._spilled.setdefault(key, (0.0, 0.0))
            return
        encoded = key.encode("utf-8")
        size = 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16  # the library's entry: length, padded key, two doubles
        capacity = self._capacity
        while self._used + size > capacity:
            capacity *= 2
        if capacity > self._capacity:
            try:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise
                if not self._spilled:
                    log.warning("metrics file %s has no room to grow (%s): new series wait in memory", self._fname, exc.strerror)
                self._spilled.setdefault(key, (0.0, 0.0))
                return
        super()._init_value(key)

    def read_value(self, key: str) -> tuple[float, float]:
        if key not in self._positions:
            self._init_value(key)
        if key not in self._positions:
            return self._spilled[key]
        return _unpack_two_doubles(self._m, self._positions[key])

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        if key not in self._positions:
            self._init_value(key)
        if key not in self._positions:
            self._spilled[key] = (value, timestamp)
            return
        self._spilled.pop(key, None)
        _pack_two_doubles(self._m, self._positions[key], value, timestamp)


def use_allocated_files() -> None:
    """Make every multiprocess value of this process use AllocatedMmapedDict (the library looks the
    class up in its `values` module each time it opens a file)."""
    values.MmapedDict = AllocatedMmapedDict

