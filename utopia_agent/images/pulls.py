"""Image pulls: only when the engine lacks the image, with their progress logged and timed.

The engine's pull request itself, within the overall and no-progress timeouts, is
engine/image_pull.py's (DockerManager.pull).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..engine.manager import DockerManager
from ..errors import ImagePullFailed
from ..observability.prometheus import PULL_DURATION

log = logging.getLogger("utopia_agent.docker")

PULL_PROGRESS_INTERVAL = 5.0


def ensure_image(docker: DockerManager, image: str) -> dict[str, str]:
    """Pull `image` unless the engine has it; return its labels, which the engine copies onto
    every container made from it."""
    labels = docker.image_labels(image)
    if labels is None:
        pull(docker, image)
        labels = docker.image_labels(image)
    if labels is None:
        raise ImagePullFailed(f"cannot pull {image}: the engine lost it right after the pull", image=image)
    return labels


def pull(docker: DockerManager, image: str) -> None:
    """Pull within the overall and no-progress timeouts, logging progress and the outcome."""
    progress = _PullProgress(image)
    log.info("image pull started image=%s", image, extra={"image": image})
    try:
        docker.pull(image, progress.update)
    except ImagePullFailed as exc:
        PULL_DURATION.labels("failed").observe(progress.elapsed())
        log.warning("image pull failed image=%s seconds=%.1f reason=%s", image, progress.elapsed(), exc.message, extra={"image": image})
        raise
    PULL_DURATION.labels("ok").observe(progress.elapsed())
    log.info("image pull finished image=%s seconds=%.1f %s", image, progress.elapsed(), progress.summary(), extra={"image": image})


class _PullProgress:
    """Logs a pull's progress every few seconds: layers done and bytes downloaded."""

    def __init__(self, image: str):
        self._image = image
        self._started = time.monotonic()
        self._last_log = self._started
        self._layers: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        layer = event.get("id")
        status = event.get("status", "")
        if layer and "progressDetail" in event and event["progressDetail"].get("total"):
            detail = event["progressDetail"]
            if status.startswith("Downloading"):
                self._layers[layer] = (detail.get("current", 0), detail["total"])
        if layer and status in ("Pull complete", "Already exists", "Download complete"):
            self._done.add(layer)
        now = time.monotonic()
        if now - self._last_log >= PULL_PROGRESS_INTERVAL:
            self._last_log = now
            log.info("image pull progress image=%s seconds=%.0f %s", self._image, self.elapsed(), self.summary())

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def summary(self) -> str:
        current = sum(c for c, _ in self._layers.values())
        total = sum(t for _, t in self._layers.values())
        return f"layers_done={len(self._done)} downloaded_mb={current / 1e6:.1f} of_mb={total / 1e6:.1f}"
