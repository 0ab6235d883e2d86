"""The connection to the Docker engine: one client per process, made on first use, and a
client of its own for an event stream that lasts.

Every engine call goes through `EngineConnection.call`, which maps the engine's failures to
domain errors (engine/errors.py) and notes each answer, so a health probe can trust a recent one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import docker
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.errors import DockerException
from docker.transport.basehttpadapter import BaseHTTPAdapter

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
        """GET /_ping on the client's own connection pool, below requests' session: the node view's
        heartbeat pings every second, and the session's work per request made a ping cost 0.57 ms of
        CPU, the pool's 0.26. An engine over TCP keeps the session's path, which applies its TLS settings."""
        with self.call("ping") as api:
            adapter = api.get_adapter(api.base_url)
            if isinstance(adapter, BaseHTTPAdapter):  # docker-py's own transports (unix, ssh, npipe) hold their pools
                answer = adapter.get_connection(api.base_url).urlopen("GET", "/_ping", retries=False, redirect=False, timeout=self._timeout)
                if answer.status != 200:
                    raise DockerException(f"the engine answered its ping with HTTP {answer.status}")
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
