"""Image pulls within the overall and no-progress timeouts, with their progress logged and timed.

The engine layer (DockerManager.ensure_image) asks for a pull only when the engine lacks the
image, and hands over its low-level client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import docker
import requests
import urllib3
from docker.errors import APIError

from ..config import Config
from ..engine.errors import is_timeout
from ..errors import EngineUnavailable, ImagePullFailed
from ..observability.prometheus import PULL_DURATION

log = logging.getLogger("utopia_agent.docker")

PULL_PROGRESS_INTERVAL = 5.0


def pull(api: docker.APIClient, image: str, config: Config) -> None:
    """Pull within the overall and no-progress timeouts, logging progress and the outcome."""
    progress = _PullProgress(image)
    log.info("image pull started image=%s", image, extra={"image": image})
    try:
        _stream_pull(api, image, config, progress)
    except ImagePullFailed as exc:
        PULL_DURATION.labels("failed").observe(progress.elapsed())
        log.warning("image pull failed image=%s seconds=%.1f reason=%s", image, progress.elapsed(), exc.message, extra={"image": image})
        raise
    PULL_DURATION.labels("ok").observe(progress.elapsed())
    log.info("image pull finished image=%s seconds=%.1f %s", image, progress.elapsed(), progress.summary(), extra={"image": image})


def _stream_pull(api: docker.APIClient, image: str, config: Config, progress: _PullProgress) -> None:
    """The engine's pull request, with a read timeout equal to the no-progress timeout.

    docker-py's `pull` sends `timeout=None` and would wait on a stalled registry forever,
    so this sends the same request through its lower-level calls. Closing the response
    is what makes the engine abandon the pull, so every way out of here closes it.
    """
    repository, tag = docker.utils.parse_repository_tag(image)
    auth_header = docker.auth.get_config_header(api, docker.auth.resolve_repository_name(repository)[0])
    deadline = time.monotonic() + config.pull_timeout
    response = None
    try:
        response = api._post(
            api._url("/images/create"),
            params={"fromImage": repository, "tag": tag or "latest"},
            headers={"X-Registry-Auth": auth_header} if auth_header else {},
            stream=True,
            timeout=(config.engine_timeout, config.pull_idle_timeout),
        )
        api._raise_for_status(response)
        for event in api._stream_helper(response, decode=True):
            if "error" in event:
                raise ImagePullFailed(f"cannot pull {image}: {event['error']}", image=image)
            progress.update(event)
            if time.monotonic() > deadline:
                raise ImagePullFailed(f"cannot pull {image}: took longer than {config.pull_timeout:g} s", image=image)
    except APIError as exc:
        raise ImagePullFailed(f"cannot pull {image}: {exc.explanation or exc}", image=image) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if is_timeout(exc):
            raise ImagePullFailed(f"cannot pull {image}: no progress for {config.pull_idle_timeout:g} s", image=image) from None
        raise EngineUnavailable(f"the Docker engine is unreachable (pull image): {type(exc).__name__}") from None
    finally:
        if response is not None:
            response.close()


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
