"""Tidies what a crash leaves behind: containers created but never started, and volume pins of
claims whose container is gone. Every worker runs one; a stamp in the state dir lets one sweep
a node per interval, whichever worker comes first."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .allocator import Allocator
from ..errors import AgentError

log = logging.getLogger("utopia_agent.janitor")

SWEEP_INTERVAL_SECONDS = 30.0


class Janitor:
    def __init__(self, allocator: Allocator, stamp: Path, unstarted_seconds: float):
        """`unstarted_seconds`: a container created but not started for this long lost its create
        request (its worker died), and is removed."""
        self._allocator = allocator
        self._stamp = stamp
        self._unstarted_seconds = unstarted_seconds
        self._interval = min(SWEEP_INTERVAL_SECONDS, unstarted_seconds / 2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)

    def start(self) -> Janitor:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self._interval / 2):
            if not self._due():
                continue
            try:
                self._allocator.sweep(self._unstarted_seconds)
            except AgentError as error:
                log.warning("sweep skipped: %s", error.message)
            except OSError as error:
                log.error("sweep failed: %s", error)

    def _due(self) -> bool:
        """True for one worker per interval: the one that finds the stamp old and renews it."""
        try:
            if time.time() - os.stat(self._stamp).st_mtime < self._interval:
                return False
        except FileNotFoundError:
            pass
        self._stamp.touch()
        return True
