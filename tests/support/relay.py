"""A unix socket in front of the engine's that counts the API calls passing through it.

An agent given `DOCKER_HOST=relay.url` talks to the real engine through it, so a test can
say how many inspects (or event streams) the agent asked for, and when.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")
INSPECT = re.compile(r"GET (/v[\d.]+)?/containers/[0-9a-f]+/json")
EVENTS = re.compile(r"GET (/v[\d.]+)?/events\b")


def engine_socket() -> str:
    """The path of the engine's unix socket, from DOCKER_HOST or the default."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise ValueError(f"the relay needs a unix-socket engine, not {host}")
    return host[len("unix://"):]


class EngineRelay:
    def __init__(self, path: Path, target: str | None = None):
        self.path = path
        self.target = target or engine_socket()
        self._calls: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(64)
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def calls(self, pattern: re.Pattern) -> list[str]:
        """The request lines so far ("GET /v1.41/containers/<id>/json") that match `pattern`."""
        with self._lock:
            return [call for call in self._calls if pattern.match(call)]

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                engine.connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, engine]
            threading.Thread(target=self._pump, args=(client, engine, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(engine, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        """Copy bytes one way; on the way to the engine, note each request line."""
        pending = b""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if requests:
                    pending += data
                    end = 0
                    for match in REQUEST_LINE.finditer(pending):
                        with self._lock:
                            self._calls.append(f"{match.group(1).decode()} {match.group(2).decode()}")
                        end = match.end()
                    pending = pending[end:][-4096:]
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
