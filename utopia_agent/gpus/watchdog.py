"""Every NVML call is timed: one that does not return within UTOPIA_AGENT_NVML_TIMEOUT marks NVML hung.

A call into a wedged driver cannot be interrupted, so the watchdog does not try. NVML is only
ever called from background threads (the GPU sampler and the event watcher); each call is
registered here while it runs, and readers (/health, the allocator, the metrics) ask whether
one has been running too long. No request thread makes an NVML call, so none waits on a hung one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator

log = logging.getLogger("utopia_agent.nvml")

DEFAULT_TIMEOUT_SECONDS = 5.0


class NvmlWatchdog:
    """The NVML calls in flight in this process, each with when it started."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ids = itertools.count()
        # token -> (function name, monotonic start, seconds it may block by design)
        self._in_flight: dict[int, tuple[str, float, float]] = {}
        self._reported: set[int] = set()

    @contextmanager
    def watch(self, name: str, allowance: float = 0.0) -> Iterator[None]:
        """Register the call `name` while it runs; `allowance` is how long it may block by design
        (an event wait with a timeout of its own) before the NVML timeout starts to count."""
        token = next(self._ids)
        started = time.monotonic()
        with self._lock:
            self._in_flight[token] = (name, started, allowance)
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                del self._in_flight[token]
                self._reported.discard(token)
            # Said by the process whose call it was, whether or not a reader of this process asked in the
            # meantime (with several workers, /health may have been answered by the others alone).
            if elapsed > self.timeout + allowance:
                log.warning("NVML answered again: %s returned after %.1f s", name, elapsed)

    def hung(self) -> str | None:
        """Why NVML counts as hung (its longest overdue call), or None while every call is in time."""
        now = time.monotonic()
        with self._lock:
            overdue = [
                (now - started, name, token)
                for token, (name, started, allowance) in self._in_flight.items()
                if now - started > self.timeout + allowance
            ]
            if not overdue:
                return None
            elapsed, name, token = max(overdue)
            first_report = token not in self._reported
            self._reported.add(token)
        reason = f"NVML is hung: {name} has not returned for {elapsed:.1f} s"
        if first_report:
            log.error("%s (UTOPIA_AGENT_NVML_TIMEOUT=%g)", reason, self.timeout)
        return reason
