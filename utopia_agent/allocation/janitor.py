"""Tidies what a crash leaves behind: containers created but never started, claims a reboot left
stopped because their claim volumes were not mounted yet, and volume pins of claims whose
container is gone. Every worker runs one; one sweeps the node per interval
(node/chore.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from .allocator import Allocator
from ..node.chore import NodeChore
from ..errors import AgentError

log = logging.getLogger("utopia_agent.janitor")

SWEEP_INTERVAL_SECONDS = 30.0


class Janitor:
    def __init__(self, allocator: Allocator, stamp: Path, unstarted_seconds: float):
        """`unstarted_seconds`: a container created but not started for this long lost its create
        request (its worker died), and is removed."""
        self._allocator = allocator
        self._unstarted_seconds = unstarted_seconds
        self._chore = NodeChore("janitor", stamp, min(SWEEP_INTERVAL_SECONDS, unstarted_seconds / 2), self._sweep)

    def start(self) -> Janitor:
        self._chore.start()
        return self

    def close(self) -> None:
        self._chore.close()

    def _sweep(self) -> None:
        try:
            self._allocator.sweep(self._unstarted_seconds)
        except AgentError as error:
            log.warning("sweep skipped: %s", error.message)
        except OSError as error:
            log.error("sweep failed: %s", error)
