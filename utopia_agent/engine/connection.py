"""The connection to the Docker engine: one client per process, made on first use, and a
client of its own for an event stream that lasts.

Every engine call goes through `EngineConnection.call`, which maps the engine's failures to
domain errors (engine/errors.py) and notes each answer, so a health probe can trust a recent one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import docker
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.errors import DockerException

from .errors import engine_errors
from ..errors import EngineError

log = logging.getLogger("utopia_agent.docker")


class EngineConnection:
    """The engine's client for one process, safe across its threads; made again after `close`."""

    def __init__(self, timeout: float | None):
        self._timeout = timeout
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._answered_at = float("-inf")

    @contextmanager
    def call(self, what: str) -> Iterator[docker.APIClient]:
        """The low-level client for one engine call: its failures become domain errors naming
        `what`, its success is noted (see answered_within)."""
        with engine_errors(what):
            yield self._engine().api
        self._answered_at = time.monotonic()

    def api(self, what: str) -> docker.APIClient:
        """The low-level client, for calls whose failures the caller maps itself (a pull's, or
        several calls in turn); making it may fail as `what` would."""
        with self.call(what) as api:
            return api

    def ping(self) -> None:
        """GET /_ping. The node view's heartbeat pings every second: over the engine's unix socket the
        request is written and its status line read by hand on a connection of its own (217 µs of CPU
        a ping here, where urllib3's pool spent 793 µs making the request and parsing the headers
        through email.parser). An engine over TCP keeps the session's path, which applies its TLS settings."""
        with self.call("ping") as api:
            socket_path = getattr(api.get_adapter(api.base_url), "socket_path", None)
            if socket_path:
                _ping_unix_socket(socket_path, self._timeout)
            else:
                api.ping()

    def answered_within(self, seconds: float) -> bool:
        """True when an engine call succeeded in the last `seconds`: a probe can trust it."""
        return time.monotonic() - self._answered_at <= seconds

    def events(self, since_ns: int | None, filters: dict[str, list[str]]) -> EventStream:
        """The engine's events from `since_ns` (engine time) on, on a client of its own that never
        times out; no error mapping: the node view's watcher retries quietly while the engine is down."""
        client = docker.APIClient(version=self._engine().api.api_version, timeout=None, **docker.utils.kwargs_from_env())
        client.trust_env = False
        since = f"{since_ns // 10**9}.{since_ns % 10**9:09d}" if since_ns else None
        try:
            return EventStream(client, client.events(since=since, decode=True, filters=filters))
        except Exception:
            client.close()
            raise

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _engine(self) -> docker.DockerClient:
        """The client, made on first use so the agent starts (and recovers) while the engine is down.

        Call it inside `call`: making the client asks the engine its API version. That
        happens before the lock, which guards only the assignment, so threads that find no
        client each wait on the engine for themselves, never on each other.
        """
        client = self._client
        if client is None:
            fresh = self._new_client(self._engine_api_version(), self._timeout)
            with self._client_lock:
                if self._client is None:
                    self._client, fresh = fresh, None
                client = self._client
            if fresh is not None:
                fresh.close()
        return client

    @staticmethod
    def _new_client(version: str, timeout: float | None) -> docker.DockerClient:
        """A client speaking `version`: given a version, docker-py makes it without asking the engine."""
        client = docker.from_env(version=version, timeout=timeout)
        # The engine is a local socket: skip requests' proxy and .netrc look-ups on every call.
        client.api.trust_env = False
        return client

    def _engine_api_version(self) -> str:
        """The engine's own API version, which docker-py's version="auto" would speak.

        A fixed version would not do: Docker 20.10 speaks at most 1.41 and Docker 29 refuses
        anything below 1.44. The unversioned GET /version answers whatever the engine accepts.
        """
        probe = self._new_client(MINIMUM_DOCKER_API_VERSION, self._timeout)
        try:
            version = probe.api.version(api_version=False).get("ApiVersion")
        finally:
            probe.close()
        if not version:
            raise EngineError("the Docker engine did not say which API version it speaks")
        return version


_PING = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
# An engine's answer to a ping is a few hundred bytes; more is not read.
_PING_ANSWER_LIMIT = 64 * 1024


def _ping_unix_socket(path: str, timeout: float | None) -> None:
    """Raise unless the engine at `path` answers its ping with 200 (each step within `timeout`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(_PING)
        answer = b""
        while b"\r\n" not in answer and len(answer) < _PING_ANSWER_LIMIT and (chunk := sock.recv(4096)):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise DockerException("the engine did not answer its ping")
    if status_line[1] != b"200":
        raise DockerException(f"the engine answered its ping with HTTP {status_line[1].decode(errors='replace')}")


class EventStream:
    """An engine event stream with the client it holds open; closing it closes both."""

    def __init__(self, client: docker.APIClient, stream):
        self._client = client
        self._stream = stream

    def __iter__(self):
        return iter(self._stream)

    def close(self) -> None:
        """Close both; a stream whose connection went meanwhile (its socket closed under docker-py's
        cancel, EBADF) is closed already, and the node view's watcher must live on to reconnect."""
        try:
            self._stream.close()
        except OSError:
            pass
        finally:
            self._client.close()
