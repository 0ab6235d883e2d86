"""The engine connection's own calls: the ping, which the node view's watcher sends every second while
no event comes, written by hand on a unix socket connection of its own (each way of failing, through the relay in
front of the real engine, says the engine is unavailable, as /health reports it; what it costs is
`make bench`'s to say), and closing an event stream."""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from docker.errors import DockerException

from utopia_agent.engine.connection import EngineConnection, EventStream, _ping_unix_socket
from utopia_agent.errors import EngineUnavailable


@pytest.fixture
def relayed_connection(relay, monkeypatch):
    """An engine connection whose DOCKER_HOST is the relay."""
    monkeypatch.setenv("DOCKER_HOST", relay.base_url)
    connection = EngineConnection(timeout=2.0)
    yield connection
    connection.close()


def test_a_ping_is_noted_as_an_answer(relayed_connection, relay):
    relayed_connection.ping()
    assert relayed_connection.answered_within(1.0)
    assert relay.count(r"^/_ping$", "GET") == 1


def test_a_ping_the_engine_fails_says_the_engine_is_unavailable(relayed_connection, relay):
    relay.fail(r"/_ping$", status=500)
    with pytest.raises(EngineUnavailable, match=r"unreachable \(ping\)"):
        relayed_connection.ping()


def test_a_dropped_ping_says_the_engine_is_unreachable(relayed_connection, relay):
    relayed_connection.ping()
    relay.drop(r"/_ping$")
    with pytest.raises(EngineUnavailable, match=r"unreachable \(ping\)"):
        relayed_connection.ping()


def test_a_hung_ping_times_out_within_the_engine_timeout(relayed_connection, relay):
    relayed_connection.ping()
    relay.hang(r"/_ping$")
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnavailable, match=r"timed out \(ping\)"):
            relayed_connection.ping()
    finally:
        relay.clear()
    assert time.monotonic() - started < 2.0 + 1.0



class GoneStream:
    """docker-py's event stream after its connection went under it: cancelling it fails on the socket."""

    def close(self) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")


class Client:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_closing_a_stream_whose_connection_went_closes_its_client_and_raises_nothing():
    """The node view's watcher closes its stream after every failure: a raise there would end the
    watcher's thread, and the view would never come back."""
    client = Client()
    EventStream(client, GoneStream()).close()
    assert client.closed


@pytest.mark.parametrize("answer, refusal", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK", None),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "with HTTP 404"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "did not answer"),
    (b"", "did not answer"),
])
def test_the_hand_written_ping_reads_the_status_line(tmp_path, answer, refusal):
    """Without an engine: whatever listens on the socket, only an HTTP 200 status line is a ping's answer."""
    path = str(tmp_path / "engine.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def answer_once() -> None:
            client, _ = listener.accept()
            with client:
                client.recv(4096)
                client.sendall(answer)

        server = threading.Thread(target=answer_once)
        server.start()
        try:
            if refusal is None:
                _ping_unix_socket(path, 2.0)
            else:
                with pytest.raises(DockerException, match=refusal):
                    _ping_unix_socket(path, 2.0)
        finally:
            server.join(timeout=5)
