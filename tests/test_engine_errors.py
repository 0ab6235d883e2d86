"""An engine that answers with failures: 502 with its reason, never a 404 that frees a claim;
an engine that does not answer: 503 for each request within the engine timeout.

The agent talks to the real engine through a relay (tests/support/relay.py) that fails
chosen requests on cue, so each failure reaches the agent exactly as dockerd would send it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from tests.fake_nvml import fake_gpus
from tests.test_engine_faults import ENGINE_TIMEOUT, MARGIN, timed

REASON = "injected: devicemapper thin pool has no free data space"
UNKNOWN_ID = "0123456789ab"
NODE_GPUS = 2


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


@pytest.mark.usefixtures("nvidia_path")
def test_engine_failure_on_show_and_delete_is_502_and_the_container_stays(relayed_agent, relay, docker_client, test_image, claim):
    agent = relayed_agent()
    created = agent.create(claim(), test_image, gpu_count=NODE_GPUS, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]

    relay.fail(container_id, message=REASON)
    assert_engine_error(agent.delete(f"/api/v1/containers/{container_id}"))
    assert docker_client.containers.get(container_id).status == "running"
    # A show the node view cannot answer asks the engine: its failure is 502 too, never 404.
    unknown = "ab" * 32
    relay.fail(unknown, message=REASON)
    inspects = relay.count(f"/containers/{unknown}/json")
    assert_engine_error(agent.get(f"/api/v1/containers/{unknown}"))
    assert relay.count(f"/containers/{unknown}/json") == inspects + 1, "the answer came from the engine"

    relay.clear()
    relay.fail(f"/containers/{container_id}$", method="DELETE", message=REASON)
    assert_engine_error(agent.delete(f"/api/v1/containers/{container_id}"))
    assert [c.id for c in claim_containers(docker_client, claim())] == [container_id], "the claim still holds its GPUs"
    shown = agent.get(f"/api/v1/containers/{container_id}")
    assert shown.status_code == 200 and len(shown.json()["gpu_ids"]) == NODE_GPUS, shown.text

    relay.clear()
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
    assert claim_containers(docker_client, claim()) == []


def test_engine_failure_on_list_is_502(relayed_agent, relay):
    """With no event stream the node view is not trusted, so the list asks the engine, and its failure is 502."""
    relay.fail(r"/events", message=REASON)
    relay.fail(r"/containers/json$", message=REASON)
    agent = relayed_agent()
    assert_engine_error(agent.get("/api/v1/containers"))
    relay.clear()
    assert agent.get("/api/v1/containers").status_code == 200


@pytest.mark.parametrize("status, text", [
    (500, "Multiple IDs found with provided prefix: {}"),  # Docker 20.10
    (400, "multiple IDs found with provided prefix: {}"),  # later engines
])
def test_unknown_and_ambiguous_ids_are_404(relayed_agent, relay, status, text):
    agent = relayed_agent()
    ambiguous = "abcdef012345"
    relay.fail(f"/containers/{ambiguous}", status=status, message=text.format(ambiguous))
    for container_id in (UNKNOWN_ID, ambiguous):
        for method in ("GET", "DELETE"):
            response = agent.request(method, f"/api/v1/containers/{container_id}")
            assert response.status_code == 404 and response.json()["error"] == "not_found", (method, container_id, response.text)
    assert relay.count(f"/containers/{ambiguous}/json") == 2


@pytest.mark.parametrize("path", [r"/containers/create$", r"/containers/[0-9a-f]{64}/start$"])
def test_engine_failure_on_create_or_start_is_502_and_leaves_nothing(relayed_agent, relay, docker_client, test_image, claim, path):
    agent = relayed_agent()
    relay.fail(path, method="POST", message=REASON)
    assert_engine_error(agent.create(claim(), test_image, gpu_count=NODE_GPUS, command=["sleep", "600"]))
    assert claim_containers(docker_client, claim()) == []
    relay.clear()
    again = agent.create(claim("next"), test_image, gpu_count=NODE_GPUS, command=["sleep", "600"])
    assert again.status_code == 201, "no GPU stayed allocated: " + again.text


@pytest.mark.parametrize("path", ["/health", "/api/v1/containers"])
def test_concurrent_requests_on_a_hung_engine_are_not_serialised(relayed_agent, relay, path):
    """The engine client is made without a lock held across its engine call, and list refreshes
    share one call instead of queueing on a lock: no request waits for another's call to time out."""
    relay.hang("")
    agent = relayed_agent(workers=1)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: timed(lambda: agent.get(path)), range(5)))
    assert [response.status_code for response, _ in answers] == [503] * 5, answers[0][0].text
    assert max(took for _, took in answers) < ENGINE_TIMEOUT + MARGIN, [round(took, 1) for _, took in answers]
