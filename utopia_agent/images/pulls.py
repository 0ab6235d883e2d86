"""Image pulls: only when the engine lacks the image, with their progress logged and timed, and
the registry's word asked for a cached private image.

The engine's pull request itself, within the overall and no-progress timeouts, is
engine/image_pull.py's (DockerManager.pull); which images are private is access.py's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..engine.image_pull import RegistryAuth
from ..engine.manager import DockerManager
from ..errors import ImagePullFailed, ImageUnavailable
from ..observability.prometheus import PULL_DURATION
from .access import PrivateImages

log = logging.getLogger("utopia_agent.docker")

PULL_PROGRESS_INTERVAL = 5.0


def ensure_image(docker: DockerManager, private: PrivateImages, image: str, auth: RegistryAuth | None = None) -> dict[str, str]:
    """Pull `image` unless the engine has it; return its labels, which the engine copies onto
    every container made from it. A cached private image is given only to a caller whose
    credentials its registry accepts (one manifest check); a public or preloaded one costs no
    more than the engine's inspect and a read of the small private-images record."""
    present = docker.present_image(image)
    if present is None:
        return _pull_for_create(docker, private, image, auth)
    if references := private.references(image, present.id):
        if auth is None:
            raise ImageUnavailable(f"{image} was pulled with credentials: it is private on this node; give the registry's credentials "
                                   "(registry_auth)", image=image)
        docker.check_registry_access(image if image in references else references[0], auth)
    return present.labels


def _pull_for_create(docker: DockerManager, private: PrivateImages, image: str, auth: RegistryAuth | None) -> dict[str, str]:
    if auth is not None:
        private.pulling(image)
    try:
        pull(docker, image, auth)
        present = docker.present_image(image)
        if present is None:
            raise ImagePullFailed(f"cannot pull {image}: the engine lost it right after the pull", image=image)
    except BaseException:
        if auth is not None:
            private.failed(image)
        raise
    if auth is not None:
        private.pulled(image, present.id, auth.owner(image))
    else:
        private.made_public(image, present.id)
    return present.labels


def pull(docker: DockerManager, image: str, auth: RegistryAuth | None = None) -> None:
    """Pull within the overall and no-progress timeouts, logging progress and the outcome."""
    progress = _PullProgress(image)
    log.info("image pull started image=%s credentials=%s", image, "given" if auth else "none", extra={"image": image})
    try:
        docker.pull(image, progress.update, auth)
    except (ImagePullFailed, ImageUnavailable) as exc:
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
