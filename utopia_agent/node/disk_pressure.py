"""Disk pressure: the filesystem of the engine's data root, or of the state dir, has less free
space than UTOPIA_AGENT_DISK_PRESSURE_PERCENT (kubelet's `nodefs.available<10%`).

Under pressure creates answer 507 naming the filesystem, /health says so and stays 200, and
image collection runs at once. Every worker judges for itself from statvfs (3 us here): /health,
the node view and scrapes at most once per CHECK_SECONDS, so polling them costs nothing; a create
looks afresh, so none is taken on a look older than the node's announcement of pressure. One worker of the node (the
holder of STATE_DIR/disk-pressure.lock) watches for pressure starting and ending, puts a `node`
change in the event history and starts image collection.

The engine's data root is what the engine's `info` calls DockerRootDir, looked up at that path
in the agent's own mount namespace: agent and engine run on the same host and see the same
filesystems (a containerised agent needs the data root mounted at the same path).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AgentError, InsufficientStorage
from ..events.changes import node_change
from ..events.history import EventHistory
from .role import NodeRole
from .state_file import StateFile

log = logging.getLogger("utopia_agent.disk")

CHECK_SECONDS = 1.0
ROOT_RETRY_SECONDS = 5.0
STATE_DIR, DATA_ROOT = "state_dir", "data_root"
_WHAT = {STATE_DIR: "the agent's state dir", DATA_ROOT: "the engine's data root"}


@dataclass(frozen=True)
class Filesystem:
    """One filesystem the agent watches, by a directory on it, and its free share when last looked at."""

    name: str  # state_dir or data_root
    path: str
    free_percent: float

    def describe(self) -> str:
        return f"{_WHAT[self.name]} {self.path} has {self.free_percent:.1f}% free"


class DiskPressure:
    def __init__(self, state_dir: Path, percent: int, data_root: Callable[[], str | None], history: EventHistory,
                 on_pressure: Callable[[], None]):
        """`data_root`: the engine's data root (None while the engine does not say); `on_pressure`:
        what the watcher does when pressure starts (image collection)."""
        self._state_dir = str(state_dir)
        self._percent = percent
        self._data_root = data_root
        self._root: str | None = None  # learned by this worker's thread, so no request waits on the engine for it
        self._history = history
        self._on_pressure = on_pressure
        # When this worker last looked, what it found, and which of those were short.
        self._looked: tuple[float, tuple[Filesystem, ...], tuple[Filesystem, ...]] = (-CHECK_SECONDS, (), ())
        self._announced = StateFile(state_dir / "disk-pressure.json")
        self._role = NodeRole(state_dir / "disk-pressure.lock")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="disk-pressure", daemon=True)

    def filesystems(self) -> tuple[Filesystem, ...]:
        """The watched filesystems with their free share, looked at no more than once per CHECK_SECONDS."""
        return self._look_now()[1]

    def pressed(self) -> tuple[Filesystem, ...]:
        """The filesystems under pressure now (none while UTOPIA_AGENT_DISK_PRESSURE_PERCENT is 0)."""
        return self._look_now()[2]

    def _look_now(self, fresh: bool = False) -> tuple[float, tuple[Filesystem, ...], tuple[Filesystem, ...]]:
        looked = self._looked
        now = time.monotonic()
        if not fresh and now - looked[0] < CHECK_SECONDS:
            return looked
        found = tuple(fs for name, path in ((STATE_DIR, self._state_dir), (DATA_ROOT, self._root)) if path
                      if (fs := _look(name, path)) is not None)
        looked = self._looked = (now, found, tuple(fs for fs in found if fs.free_percent < self._percent))
        return looked

    def refuse_if_pressed(self) -> None:
        """A create under disk pressure is 507, naming the first filesystem short of space (looked at now)."""
        if pressed := self._look_now(fresh=True)[2]:
            first = pressed[0]
            raise InsufficientStorage(
                f"disk pressure: {first.describe()}, under UTOPIA_AGENT_DISK_PRESSURE_PERCENT={self._percent}; no new claims until space is freed",
                filesystem=first.path,
            )

    def start(self) -> DiskPressure:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._role.held:
            self._thread.join(timeout=2.0)

    def _watch(self) -> None:
        """Learn the engine's data root; then be the node's one watcher (the others sleep in flock),
        telling each start and end of pressure once."""
        while self._root is None and not self._closed.is_set():
            try:
                self._root = self._data_root()
            except AgentError as error:
                log.debug("the engine's data root is not known yet: %s", error.message)
            if self._root is None:
                self._closed.wait(ROOT_RETRY_SECONDS)
        if self._closed.is_set():
            return
        self._role.take(block=True)
        try:
            announced, untold = bool(self._announced.read().get("disk_pressure")), False
            while not self._closed.wait(CHECK_SECONDS):
                pressed = self.pressed()
                if bool(pressed) != announced:
                    try:
                        self._announce(pressed)
                    except OSError as error:  # the state dir is full: the next look tells it
                        if not untold:
                            log.warning("disk pressure not told yet: %s", error.strerror or error)
                        untold = True
                        continue
                    announced, untold = bool(pressed), False
        finally:
            self._role.release()

    def _announce(self, pressed: tuple[Filesystem, ...]) -> None:
        state = {"disk_pressure": bool(pressed), "filesystems": [asdict(fs) for fs in pressed]}
        self._history.record([node_change("disk_pressure" if pressed else "disk_pressure_ended", state)])
        try:
            self._announced.write(state, durable=False)  # only so a restart does not tell it again
        except OSError:
            pass
        if pressed:
            log.warning("disk pressure: %s; creates answer 507 and image collection runs", "; ".join(fs.describe() for fs in pressed))
            self._on_pressure()
        else:
            log.warning("disk pressure ended: creates are taken again")


def _look(name: str, path: str) -> Filesystem | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    if not stat.f_blocks:
        return None
    return Filesystem(name, path, round(stat.f_bavail * 100 / stat.f_blocks, 2))
