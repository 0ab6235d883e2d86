"""The engine connection's own calls: the ping, which the node view's watcher sends every second while
no event comes, written by hand on a unix socket connection of its own (each way of failing, through the relay in
front of the real engine, says the engine is unavailable, as /health reports it; what it costs is
`make bench`'s to say), and closing an event stream."""

from __future__ import annotations

import errno
import time

import pytest

from utopia_agent.engine.connection import EngineConnection, EventStream
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
