"""A relay in front of the real Docker engine that fails chosen requests on cue.

The agent under test gets `DOCKER_HOST=unix://<relay socket>`. Each request goes on to the
real engine and its answer comes back as it arrives (event streams and pulls included),
unless a fault matches it: then the relay answers with an error as dockerd does
(`{"message": ...}`), hangs until the fault is cleared, drops the connection, or forwards it
late, as a busy engine answers.
`Connection: close` on every forwarded request keeps one request per connection, so the
relay sees, counts and judges every request the agent makes.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

# Request lines ("GET /v1.41/containers/<id>/json") a test counts with `calls`.
INSPECT = re.compile(r"GET (/v[\d.]+)?/containers/[0-9a-f]+/json")
EVENTS = re.compile(r"GET (/v[\d.]+)?/events\b")
MAX_HEAD_BYTES = 64 * 1024
# Request headers that would keep a connection open for a second request.
HOP_HEADERS = (b"connection", b"keep-alive", b"proxy-connection")


@dataclass
class Fault:
    """What to do with requests whose path matches `pattern` (and whose method is `method`, when given)."""

    pattern: re.Pattern
    action: str  # "error", "hang", "drop" or "delay"
    method: str | None = None
    status: int = 500
    message: str = ""
    seconds: float = 0.0
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.pattern.search(path))


class EngineRelay:
    """A unix socket that forwards to `upstream` (a `unix://` DOCKER_HOST), with faults on cue."""

    def __init__(self, upstream: str):
        if not upstream.startswith("unix://"):
            raise ValueError(f"the relay forwards to a unix socket, not {upstream}")
        self._upstream = upstream[len("unix://"):]
        # A short directory: a unix socket path must stay under 108 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="relay-", dir="/tmp"))
        self.socket_path = self._dir / "docker.sock"
        self.base_url = f"unix://{self.socket_path}"
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[tuple[str, str]] = []
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> EngineRelay:
        self._listener.bind(str(self.socket_path))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True).start()
        return self

    # --- what the test says --------------------------------------------------------

    def fail(self, pattern: str, method: str | None = None, status: int = 500, message: str = "injected engine failure") -> None:
        """Answer `status` with dockerd's JSON error body for matching requests."""
        self._add(Fault(re.compile(pattern), "error", method, status, message))

    def hang(self, pattern: str, method: str | None = None) -> None:
        """Accept matching requests and never answer them, until `clear()`."""
        self._add(Fault(re.compile(pattern), "hang", method))

    def drop(self, pattern: str, method: str | None = None) -> None:
        """Close the connection of matching requests without an answer."""
        self._add(Fault(re.compile(pattern), "drop", method))

    def delay(self, pattern: str, seconds: float, method: str | None = None) -> None:
        """Forward matching requests `seconds` late (sooner once cleared)."""
        self._add(Fault(re.compile(pattern), "delay", method, seconds=seconds))

    def clear(self) -> None:
        """Forward everything again; hung requests are let go (their connections closed)."""
        with self._lock:
            faults, self._faults = self._faults, []
        for fault in faults:
            fault.released.set()

    def count(self, pattern: str, method: str | None = None) -> int:
        """How many requests so far had a path matching `pattern` (and the method, when given)."""
        with self._lock:
            return sum(1 for seen_method, path in self._seen if (method is None or method == seen_method) and re.search(pattern, path))

    def calls(self, pattern: re.Pattern) -> list[str]:
        """The requests so far, as "METHOD path", that match `pattern` from their start."""
        with self._lock:
            return [f"{method} {path}" for method, path in self._seen if pattern.match(f"{method} {path}")]

    def close(self) -> None:
        self._closed.set()
        self.clear()
        self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:
            _shut(sock)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    # --- the relay itself ----------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            threading.Thread(target=self._serve, args=(client,), name="relay-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        try:
            head, body_start = _read_head(client)
            if head is None:
                return
            method, target = head.split(b" ", 2)[:2]
            method, path = method.decode(), urlsplit(target.decode()).path
            with self._lock:
                self._seen.append((method, path))
                fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None and fault.action == "delay":
                fault.released.wait(fault.seconds)
                fault = None
            if fault is None:
                self._forward(client, _closing(head), body_start)
            elif fault.action == "error":
                _drain_body(client, head, body_start)
                body = json.dumps({"message": fault.message}).encode()
                client.sendall(
                    f"HTTP/1.1 {fault.status} {HTTPStatus(fault.status).phrase}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
            elif fault.action == "hang":
                fault.released.wait()
        except OSError:
            pass
        finally:
            self._untrack(client)
            _shut(client)

    def _forward(self, client: socket.socket, head: bytes, body_start: bytes) -> None:
        """Send the request on, copy the rest of its body in one thread and the answer back in this one."""
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._track(upstream)
        try:
            upstream.connect(self._upstream)
            upstream.sendall(head + body_start)
            threading.Thread(target=_copy, args=(client, upstream), name="relay-up", daemon=True).start()
            _copy(upstream, client)
        finally:
            self._untrack(upstream)
            _shut(upstream)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """The request line and headers (without the blank line), and whatever body bytes came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > MAX_HEAD_BYTES:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _closing(head: bytes) -> bytes:
    """The head with `Connection: close` instead of any keep-alive header, and its blank line."""
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
    return b"\r\n".join(kept + [b"Connection: close", b"", b""])


def _drain_body(sock: socket.socket, head: bytes, body_start: bytes) -> None:
    """Read a Content-Length body before answering, so the client is not cut off mid-send."""
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    remaining = (int(match.group(1)) if match else 0) - len(body_start)
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            return
        remaining -= len(chunk)


def _copy(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes as they arrive until the source ends; then the target hears the end too."""
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
