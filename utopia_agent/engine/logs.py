"""A container's logs as the engine kept them (json-file, see container_config), whole or followed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import docker
import requests
import urllib3
from docker.errors import DockerException

from .connection import EngineConnection
from .errors import EngineConflict
from ..errors import NotManaged

log = logging.getLogger("utopia_agent.docker")


def read_logs(engine: EngineConnection, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> bytes:
    """What the engine kept of the container's stdout and stderr, interleaved as they were logged."""
    with _logs_call(engine, container_id) as api:
        return api.logs(container_id, stdout=True, stderr=True, timestamps=timestamps, tail=tail, since=since)


def follow_logs(engine: EngineConnection, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> LogStream:
    """The logs so far, then new lines as they come, until the container stops or the stream is closed."""
    with _logs_call(engine, container_id) as api:
        stream = api.logs(container_id, stdout=True, stderr=True, timestamps=timestamps, tail=tail, since=since, stream=True, follow=True)
    return LogStream(stream)


@contextmanager
def _logs_call(engine: EngineConnection, container_id: str) -> Iterator[docker.APIClient]:
    """A container being removed has no logs to give (the engine answers 409): for the caller it is gone."""
    try:
        with engine.call("container logs") as api:
            yield api
    except EngineConflict:
        raise NotManaged(f"container {container_id[:12]} is being removed") from None


class LogStream:
    """A followed log: iterate for chunks of bytes; `close` (from any thread) ends the iteration at once."""

    def __init__(self, stream):
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, DockerException, OSError, ValueError):
            if not self._closed.is_set():
                log.info("log stream ended by the engine")

    def close(self) -> None:
        """Shut the engine connection down, waking a read that waits for the next line."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._stream.close()
        except (OSError, DockerException, AttributeError):
            pass
