"""Clients that send slowly, stall halfway or never hang up do not stop the agent.

The agent runs as production runs it (gunicorn, several workers) and the clients are real
sockets on 127.0.0.1. While dozens of connections hold unfinished requests, a load
balancer's `/health` probe still answers at once; and the agent closes each such connection
once UTOPIA_AGENT_READ_TIMEOUT has passed since it began, however steadily it trickles.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
import requests

from tests.support.polling import wait_for
from utopia_agent.server.worker import IncomingRequest

READ_TIMEOUT = 2.0
STALLED = 64
PROBES = 10
# A probe answered within a second still counts the node as up; the agent answers in milliseconds.
PROBE_BOUND = 1.0
# How long after its deadline a stalled connection may still be open: the worker looks once a second.
CLOSE_MARGIN = 3.0
TRICKLE_EVERY = 0.5

PARTIAL_BODY = b"POST /api/v1/containers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
# What each stalled client sends first, then what it sends every TRICKLE_EVERY seconds (None: nothing more).
STALLS = [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a"),
    (b"G", None),
    (PARTIAL_BODY, b" "),
    (PARTIAL_BODY, None),
]


class StalledClient:
    def __init__(self, port: int, opening: bytes, trickle: bytes | None):
        self.opened = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(opening)
        self.trickle = trickle
        self.closed_after: float | None = None

    def poll(self) -> None:
        """Send the next byte if this one trickles, and note when the agent has closed the connection."""
        if self.closed_after is not None:
            return
        try:
            if self.trickle:
                self.sock.send(self.trickle, socket.MSG_DONTWAIT)
            gone = self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            self.closed_after = time.monotonic() - self.opened
            self.sock.close()


class StalledClients:
    """`count` clients with unfinished requests, reopened while `reopening` as the agent closes them, as an attacker would."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.clients = [StalledClient(port, *STALLS[i % len(STALLS)]) for i in range(count)]
        self.reopening = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StalledClients:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for client in self.clients:
            client.sock.close()

    def _run(self) -> None:
        while not self._stop.wait(TRICKLE_EVERY):
            for index, client in enumerate(list(self.clients)):
                client.poll()
                if client.closed_after is not None and self.reopening:
                    self.clients.append(StalledClient(self.port, *STALLS[index % len(STALLS)]))

    def all_closed(self) -> bool:
        return all(client.closed_after is not None for client in self.clients)


@pytest.fixture(scope="module")
def guarded_agent(module_agents):
    """Four workers of eight threads: 32 threads, fewer than the stalled clients."""
    return module_agents(workers=4, UTOPIA_AGENT_READ_TIMEOUT=str(READ_TIMEOUT))


@pytest.fixture(scope="module")
def one_worker_agent(module_agents):
    """One worker, so that every connection lands on the same event loop."""
    return module_agents(workers=1)


def probe(agent) -> float:
    started = time.monotonic()
    response = requests.get(agent.base_url + "/health", timeout=PROBE_BOUND * 5)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_stalled_clients_hold_off_no_probe_and_are_closed_after_the_read_timeout(guarded_agent):
    with StalledClients(guarded_agent.port, STALLED) as stalled:
        durations = [probe(guarded_agent) for _ in range(PROBES)]
        stalled.reopening = False
        closed = wait_for(stalled.all_closed, READ_TIMEOUT + CLOSE_MARGIN + TRICKLE_EVERY)
    assert max(durations) < PROBE_BOUND, durations
    assert closed, "stalled connections still open"
    lifetimes = sorted(client.closed_after for client in stalled.clients)
    assert len(lifetimes) >= STALLED
    assert READ_TIMEOUT <= lifetimes[0] and lifetimes[-1] <= READ_TIMEOUT + CLOSE_MARGIN, lifetimes


def test_clients_that_never_hang_up_hold_off_no_probe(one_worker_agent):
    """A client that reads its answer and keeps the connection open must not hold up the worker that closes it."""
    clients = [socket.create_connection(("127.0.0.1", one_worker_agent.port)) for _ in range(STALLED)]
    try:
        for client in clients:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        durations = [probe(one_worker_agent) for _ in range(PROBES)]
        for client in clients:
            client.settimeout(5)
            assert client.recv(12) == b"HTTP/1.1 200"
    finally:
        for client in clients:
            client.close()
    assert max(durations) < PROBE_BOUND, durations


def test_requests_in_pieces_pipelined_waiting_to_continue_or_over_the_body_limit_are_answered(guarded_agent):
    body = b'{"claim_id": "c", "image": "x", "gpu_count": 999}'
    head = b"POST /api/v1/containers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + guarded_agent.token.encode()
    chunked = head + b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with socket.create_connection(("127.0.0.1", guarded_agent.port), timeout=10) as client:
        for piece in (chunked[:20], chunked[20:-30], chunked[-30:-3], chunked[-3:]):
            client.sendall(piece)
            time.sleep(0.05)
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        answers = read_until(client, lambda received: received.count(b"HTTP/1.1 ") == 3)
    assert re.findall(rb"HTTP/1.1 (\d+)", answers) == [b"400", b"200", b"200"], answers
    assert b'"gpu_count"' in answers, "the chunked body reached the application"

    with socket.create_connection(("127.0.0.1", guarded_agent.port), timeout=10) as client:
        client.sendall(head + b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert read_until(client, lambda received: received.endswith(b"\r\n\r\n")) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(body)
        assert b'"gpu_count"' in read_until(client, lambda received: b'"gpu_count"' in received)

    with socket.create_connection(("127.0.0.1", guarded_agent.port), timeout=10) as client:
        client.sendall(head + b"\r\nContent-Length: 99999999\r\n\r\n{")
        answer = read_until(client, lambda received: received.endswith(b"<closed>"))
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer


def read_until(client: socket.socket, done) -> bytes:
    received = b""
    while not done(received):
        data = client.recv(65536)
        received += data if data else b"<closed>"
    return received


REQUESTS = [
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /a HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
    b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n",
    b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", REQUESTS)
def test_a_request_is_in_exactly_when_its_last_byte_is(request_bytes):
    incoming = IncomingRequest(body_limit=1024)
    in_after_each_byte = [incoming.feed(request_bytes[i:i + 1]) for i in range(len(request_bytes))]
    assert in_after_each_byte == [False] * (len(request_bytes) - 1) + [True]
    assert not incoming.cut_short


@pytest.mark.parametrize("request_bytes", [
    b"POST /a HTTP/1.1\r\nContent-Length: 1025\r\n\r\n",
    b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n401\r\n",
    b"GET /a HTTP/1.1\r\nX-A: " + b"a" * 70000,
])
def test_a_request_over_a_bound_is_handed_on_cut_short(request_bytes):
    incoming = IncomingRequest(body_limit=1024)
    assert incoming.feed(request_bytes)
    assert incoming.cut_short
