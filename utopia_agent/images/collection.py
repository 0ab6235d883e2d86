"""Image collection, as kubelet's image GC does it: past the high mark of the image filesystem,
remove the images the agent pulled that no container uses and that were last used longer than
the minimum age ago, least recently used first, until usage is under the low mark.

One worker of the node looks per interval (node/chore.py); every pull looks first too. Images the agent never pulled (preloaded) and images any
container was made from, running or not, are never removed; the engine refuses the latter too,
since removals are never forced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from ..config import Config
from ..engine.manager import DockerManager, HeldImage
from ..engine.errors import EngineConflict, EngineNotFound
from ..node.chore import NodeChore
from ..node.state_file import StateFile
from ..observability.prometheus import IMAGES_COLLECTED
from .records import PulledImages

log = logging.getLogger("utopia_agent.images")


@dataclass(frozen=True)
class StoreStatus:
    """What the last look found, for /metrics: the images held, their bytes, and whether
    collection left usage over the high mark (nothing more it may remove)."""

    images: int
    bytes: int
    usage_percent: float
    over_high: bool
    at: float


class ImageCollector:
    def __init__(self, docker: DockerManager, pulled: PulledImages, config: Config):
        self._docker = docker
        self._pulled = pulled
        self._high = config.image_gc_high_percent
        self._low = config.image_gc_low_percent
        self._min_age = config.image_gc_min_age
        self.status_file = StateFile(config.state_dir / "image-store.json")
        # At start too, so /metrics has the store's figures.
        self._chore = NodeChore("image-collection", config.state_dir / "image-collection.stamp", config.image_gc_interval, self.collect,
                                at_start=True)

    def start(self) -> ImageCollector:
        self._chore.start()
        return self

    def close(self) -> None:
        self._chore.close()

    def collect(self) -> StoreStatus | None:
        """Look once, and collect when usage is past the high mark; None while the engine does not
        say where its data root is."""
        usage = self._docker.image_store_usage()
        if usage is None:
            return None
        used, total = usage
        images = self._docker.list_images()
        in_use = self._docker.images_in_use()
        now = time.time()
        self._pulled.used(in_use, now)
        if self._high < 100 and used * 100 > self._high * total:
            used = self._remove_unused(images, in_use, now, used, total)
            images = self._docker.list_images()
        status = StoreStatus(len(images), sum(image.size for image in images), round(used * 100 / total, 2),
                             self._high < 100 and used * 100 > self._high * total, now)
        if status.over_high:
            log.warning("image collection cannot get under the high mark usage_percent=%.1f high_percent=%d", status.usage_percent, self._high)
        self.status_file.write(asdict(status), durable=False)
        return status

    def _remove_unused(self, images: list[HeldImage], in_use: dict[str, list[str]], now: float, used: int, total: int) -> int:
        last_used: dict[str, float] = {}
        for record in self._pulled.read().values():
            if record.get("id"):
                last_used[record["id"]] = max(last_used.get(record["id"], 0), record.get("last_used", 0))
        candidates = sorted((last_used[image.id], image.id, image) for image in images
                            if image.id in last_used and image.id not in in_use and last_used[image.id] <= now - self._min_age)
        for _, _, image in candidates:
            if used * 100 < self._low * total:
                break
            if self._remove(image):
                IMAGES_COLLECTED.inc()
                log.info("image collected image=%s id=%s size_mb=%.0f idle_seconds=%.0f", ",".join(image.references) or "-", image.id[7:19],
                         image.size / 1e6, now - last_used[image.id])
                used = (self._docker.image_store_usage() or (used, total))[0]
        return used

    def _remove(self, image: HeldImage) -> bool:
        """Remove every reference of `image` (the last takes the image); False when the engine refuses."""
        try:
            for reference in image.references or (image.id,):
                try:
                    self._docker.remove_image(reference)
                except EngineNotFound:
                    pass
        except EngineConflict as exc:
            log.info("image kept image=%s: %s", image.id[7:19], exc.reason)
            return False
        self._pulled.forget(image.id)
        return True

    def look(self) -> None:
        """Look (and collect past the high mark) now: at each interval, and when disk pressure starts."""
        self._chore.run_now()

