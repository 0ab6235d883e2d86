"""Tidies what a crash leaves behind: containers created but never started, claims a reboot left
stopped because their claim volumes were not mounted yet, and volume pins of claims whose
container is gone. Every worker runs one; one sweeps the node per interval
(node/chore.py)."""

from __future__ import annotations

from pathlib import Path

from .allocator import Allocator
from ..node.chore import NodeChore

SWEEP_INTERVAL_SECONDS = 30.0


class Janitor(NodeChore):
    def __init__(self, allocator: Allocator, stamp: Path, unstarted_seconds: float):
        """`unstarted_seconds`: a container created but not started for this long lost its create
        request (its worker died), and is removed."""
        super().__init__("janitor", stamp, min(SWEEP_INTERVAL_SECONDS, unstarted_seconds / 2), self._sweep)
        self._allocator = allocator
        self._unstarted_seconds = unstarted_seconds

    def _sweep(self) -> None:
        self._allocator.sweep(self._unstarted_seconds)
