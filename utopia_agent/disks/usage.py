"""Each claim's writable layer, measured by one worker of the node, and the claims past their size.

A walk of a layer (`du`) costs in proportion to its files: about 10 ms for 10,000 files here,
and kubelet's users fight the cost of walking every layer every few seconds (kubernetes
#23255, #61999). So the sampler walks a layer only when it may have changed enough to matter:

- every second it reads the used space of the filesystem holding the layers (one statvfs) and
  adds what it grew by to a node-wide growth counter (shrinking adds nothing);
- no claim can have grown by more than that counter has since its last walk, give or take what
  was freed within the same second, so a claim is walked again only when its last size plus that
  growth reaches its limit (it may be past it), and otherwise every BACKSTOP_SECONDS, which
  bounds what space freed elsewhere (a claim deleted, images collected) can hide.

An idle node thus costs one statvfs and one look at the node view a second (the claims are looked
at only when the view or the filesystem changed, or a backstop walk is due), and walks cost
what the node writes, spent on the claims closest to their limits. The figures go to one file in
the state dir, from which every worker answers stats and scrapes.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..claims.disks import GIB
from ..claims.records import DISK_QUOTA_LABEL, ManagedContainer
from ..errors import AgentError
from ..node.chore import NodeSampler
from .quota import MEASURED

log = logging.getLogger("utopia_agent.disks")

SAMPLE_SECONDS = 1.0
# Each layer is walked at least this often whatever the node's growth says (see above).
BACKSTOP_SECONDS = 300.0
# A walk that takes longer is given up (a layer of millions of files): the claim is walked again next time.
WALK_TIMEOUT_SECONDS = 60.0
STOP_REASON = "disk_limit_exceeded"


def layer_bytes(path: str, timeout: float = WALK_TIMEOUT_SECONDS) -> int | None:
    """Bytes the tree at `path` takes on its filesystem (allocated blocks, each hard-linked file
    once, as the kernel's quotas count them), by coreutils' `du`: a third of the CPU of a walk in
    Python. None when the walk failed or timed out; files that vanish meanwhile are skipped."""
    try:
        done = subprocess.run(["du", "-s", "-x", "-B1", "--", path], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return int(done.stdout.split(maxsplit=1)[0])
    except (IndexError, ValueError):
        return None


@dataclass
class Layer:
    """One claim's writable layer as the sampler knows it."""

    claim_id: str
    path: str | None
    limit_bytes: int | None
    quota: str
    used_bytes: int | None = None
    walked_at: float = 0.0
    # The node's growth counter when it was last walked.
    growth_at_walk: int = 0

    def figures(self) -> dict:
        """What the node's figures file holds for the claim."""
        return {"claim_id": self.claim_id, "used_bytes": self.used_bytes, "limit_bytes": self.limit_bytes, "walked_at": self.walked_at}

    def needs_walk(self, now: float, growth: int, backstop: float) -> bool:
        if self.used_bytes is None or now - self.walked_at >= backstop:
            return True
        return self.limit_bytes is not None and self.used_bytes + (growth - self.growth_at_walk) > self.limit_bytes


class DiskUsage(NodeSampler):
    """Measures the running claims' writable layers in the background (one worker of the node) and
    stops, through `stop(container_id, reason)`, a measured claim past its size. Its figures per
    container: claim_id, used_bytes, limit_bytes and walked_at."""

    def __init__(self, docker, disk, state_dir: Path, stop: Callable[[str, str], object] | None,
                 interval: float = SAMPLE_SECONDS, backstop: float = BACKSTOP_SECONDS):
        super().__init__("disk-usage", state_dir, interval, log, "claim disks not sampled: %s")
        self._docker = docker
        self._disk = disk
        self._stop = stop
        self._backstop = backstop
        self._layers: dict[str, Layer] = {}
        self._growth = 0
        self._last_used: int | None = None
        # The node view last looked at, and when the next backstop walk falls due.
        self._seen: object = None
        self._next_walk = 0.0

    # --- reading ---------------------------------------------------------------------

    def used_bytes(self, container_id: str) -> int | None:
        """What the container's writable layer took at its last walk; None before the first."""
        return self.samples().get("claims", {}).get(container_id, {}).get("used_bytes")

    # --- sampling --------------------------------------------------------------------

    def _sample_round(self) -> bool:
        return self.sample_if_holder()

    def sample_if_holder(self) -> bool:
        """One round when this worker measures for the node and the node view can be trusted (the
        running claims come from it, never from an engine call a second); True when it looked at
        the claims. The figures are written only when they changed: an idle node writes nothing."""
        if not self._role.take():
            return False
        snapshot = self._docker.view.snapshot()
        if snapshot is None:
            return False
        looked = self.sample(snapshot)
        if looked is None:
            return False
        figures, past = looked
        if figures["claims"] != self.samples().get("claims"):
            self._samples.write(figures)
        # After the figures are on record: a claim shown stopped shows the size that stopped it.
        unstopped = [container for container, layer in past if not self._evict(container, layer)]
        if unstopped:  # a claim past its size that could not be stopped is looked at again next second
            self._next_walk = time.time()
        return True

    def sample(self, snapshot: object = None) -> tuple[dict, list[tuple[ManagedContainer, Layer]]] | None:
        """Note the filesystem's growth and walk the layers that need it: the figures, and the
        measured claims past their size (to stop). None when nothing can have changed since the last
        look: the same node view, no growth, and no backstop walk due (an idle node's second costs a statvfs)."""
        size, free = self._disk.filesystem_bytes()
        used = size - free
        grew = self._last_used is not None and used > self._last_used
        if grew:
            self._growth += used - self._last_used
        self._last_used = used
        now = time.time()
        if snapshot is not None and snapshot is self._seen and not grew and now < self._next_walk:
            return None
        self._seen = snapshot
        containers = self._docker.list_managed()
        running = [c for c in containers if c.status == "running" and c.holdings.disk_gb]
        stopped = {c.id for c in containers if c.status != "running"}
        # A claim that no longer runs writes nothing: its last figure stands while its layer does (a stopped claim's
        # stats). One that stopped since the last look is walked once more, so that figure is its size as it stopped,
        # not one from up to a backstop period before.
        before = self.samples().get("claims", {})
        figures = {c.id: before[c.id] for c in containers if c.id in stopped and c.id in before}
        for gone in set(self._layers) - {c.id for c in running}:
            layer = self._layers.pop(gone)
            if gone in stopped and layer.path is not None and (walked := layer_bytes(layer.path)) is not None:
                layer.used_bytes, layer.walked_at = walked, now
                figures[gone] = layer.figures()
        past: list[tuple[ManagedContainer, Layer]] = []
        for container in running:
            layer = self._layers.get(container.id) or self._layer(container)
            if layer.path is not None and layer.needs_walk(now, self._growth, self._backstop):
                walked = layer_bytes(layer.path)
                if walked is not None:
                    layer.used_bytes, layer.walked_at, layer.growth_at_walk = walked, now, self._growth
            if layer.used_bytes is None:  # its walk failed (timed out on a busy disk): its last figure stands
                if container.id in before:
                    figures[container.id] = before[container.id]
                continue
            figures[container.id] = layer.figures()
            if layer.quota == MEASURED and layer.limit_bytes is not None and layer.used_bytes > layer.limit_bytes:
                past.append((container, layer))
        walked_at = [layer.walked_at for layer in self._layers.values() if layer.path is not None]
        self._next_walk = min(walked_at) + self._backstop if walked_at else float("inf")
        return {"time": now, "claims": figures}, past

    def _layer(self, container: ManagedContainer) -> Layer:
        """Found once per container: its writable layer's directory (one inspect) and its size."""
        disk_gb = container.holdings.disk_gb
        layer = Layer(
            claim_id=container.claim_id,
            path=self._docker.writable_layer(container.id),
            limit_bytes=int(disk_gb * GIB) if disk_gb else None,
            quota=container.labels.get(DISK_QUOTA_LABEL, ""),
        )
        self._layers[container.id] = layer
        return layer

    def _evict(self, container: ManagedContainer, layer: Layer) -> bool:
        """Stop the claim as kubelet evicts a pod past its ephemeral-storage limit: kept, GPUs
        released. False when it could not be stopped (tried again next second)."""
        log.warning("claim past its disk claim=%s container=%s used_mb=%d limit_mb=%d: stopping", layer.claim_id, container.id[:12],
                    layer.used_bytes // (1024 * 1024), layer.limit_bytes // (1024 * 1024),
                    extra={"claim_id": layer.claim_id, "container_id": container.id})
        if self._stop is None:
            return True
        try:
            self._stop(container.id, STOP_REASON)
        except AgentError as error:
            log.error("claim past its disk not stopped claim=%s container=%s reason=%s", layer.claim_id, container.id[:12], error.code)
            return False
        self._layers.pop(container.id, None)
        return True
