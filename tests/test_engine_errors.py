"""An engine that answers with failures: 502 with its reason, never a 404 that frees a claim.

The agent talks to the real engine through a relay (tests/support/relay.py) that fails
chosen requests on cue, so each failure reaches the agent exactly as dockerd would send it.
"""

from __future__ import annotations

import os
import time

import docker
import pytest

from tests.fake_nvml import fake_gpus
from tests.support.prerequisites import require
from tests.support.relay import EngineRelay
from tests.test_engine_faults import ENGINE_TIMEOUT

pytestmark = pytest.mark.docker

REASON = "injected: devicemapper thin pool has no free data space"
UNKNOWN_ID = "0123456789ab"
NODE_GPUS = 2


@pytest.fixture
def relay(engine):
    """A relay in front of the engine the tests use, closed after the test."""
    upstream = engine.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    require(upstream.startswith("unix://"), f"the relay forwards to a unix socket, not {upstream}")
    running = EngineRelay(upstream).start()
    yield running
    running.close()


@pytest.fixture
def relayed_agent(agent_factory, relay):
    """Starts agents on NODE_GPUS healthy GPUs whose engine is the relay; stops them after the test, before the relay goes."""
    started = []

    def make(workers: int = 2):
        started.append(agent_factory(
            workers=workers, gpus=fake_gpus(NODE_GPUS), DOCKER_HOST=relay.base_url, UTOPIA_AGENT_ENGINE_TIMEOUT=str(ENGINE_TIMEOUT),
        ))
        return started[-1]

    yield make
    for agent in started:
        agent.stop()


def claim_containers(docker_client, claim_id: str):
    return docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim_id}"})


def assert_engine_error(response) -> None:
    assert response.status_code == 502, response.text
    assert response.json()["error"] == "engine_error" and REASON in response.json()["message"], response.text


def test_the_relay_copies_a_stream_as_it_arrives(relay, docker_client, test_image):
    """The event stream is an answer that never ends: an event must come through while it is open."""
    through_relay = docker.APIClient(base_url=relay.base_url, version="auto", timeout=30)
    mark = str(time.monotonic_ns())
    # `until` ends the stream (and so the test) should the event never come.
    events = through_relay.events(decode=True, until=int(time.time()) + 30, filters={"type": ["container"], "label": [f"relay-check={mark}"]})
    try:
        docker_client.containers.create(test_image, ["true"], labels={"relay-check": mark}).remove()
        assert next(events, {}).get("Action") == "create"
    finally:
        events.close()
        through_relay.close()
    assert relay.count(r"/events$") == 1
