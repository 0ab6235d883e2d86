"""Image pulls through the agent: a real registry on loopback, its refusals, and a stalled one."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import RUN_ID, remove_run_containers
from tests.support.scrape import sample, scrape
from tests.support.engine import Registry, SlowRegistry, free_port, make_image_with, make_unique_image, remove_images


@pytest.fixture(scope="module")
def registry(engine):
    with Registry() as running:
        yield running


@pytest.fixture
def pushed_image(registry, docker_client, test_image, request):
    """An image that exists only in the loopback registry, so a create must pull it."""
    source = make_unique_image(docker_client, f"utopia-test/unique:{request.node.name[-20:].lower().strip('_-') or 'x'}")
    ref = registry.push(docker_client, source, f"t/pull-{time.monotonic_ns()}:1")
    remove_images(docker_client, [source])
    yield ref
    remove_run_containers(docker_client)
    remove_images(docker_client, [ref])


def claim_containers(docker_client, claim_id):
    return docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim_id}"})


def test_missing_image_is_pulled_then_run(agent, docker_client, pushed_image, claim):
    response = agent.create(claim(), pushed_image, command=["sleep", "300"])
    assert response.status_code == 201, response.text
    assert docker_client.images.get(pushed_image)
    assert f"image pull finished image={pushed_image}" in agent.log()
    assert sample(scrape(agent), "utopia_agent_image_pull_duration_seconds_count", outcome="ok") >= 1


def test_unknown_image_is_400_with_the_registry_reason(agent, docker_client, registry, claim):
    response = agent.create(claim(), registry.ref("t/nope:1"), command=["sleep", "300"])
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "image_unavailable"
    assert "manifest unknown" in response.json()["message"] or "not found" in response.json()["message"]
    assert claim_containers(docker_client, claim()) == []


def test_a_pulled_image_with_the_agents_labels_is_refused_after_the_pull(agent, docker_client, registry, test_image, claim):
    source = make_image_with(docker_client, f"utopia-test/forged-pull:{RUN_ID}", "LABEL utopia.managed=true utopia.claim_id=someone-else")
    ref = registry.push(docker_client, source, f"t/forged-{time.monotonic_ns()}:1")
    remove_images(docker_client, [source])
    try:
        response = agent.create(claim(), ref, command=["sleep", "300"])
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "forbidden_by_policy" and "image" in response.json()["errors"]
        assert "utopia.claim_id" in response.json()["message"] and "utopia.managed" in response.json()["message"]
        assert f"image pull finished image={ref}" in agent.log()
        assert claim_containers(docker_client, claim()) == []
        assert docker_client.containers.list(all=True, filters={"label": "utopia.claim_id=someone-else"}) == []
    finally:
        remove_images(docker_client, [ref])


def test_unreachable_registry_is_502(agent, docker_client, claim):
    response = agent.create(claim(), f"localhost:{free_port()}/t/busybox:1", command=["sleep", "300"])
    assert response.status_code == 502, response.text
    assert "connection refused" in response.json()["message"].lower()
    assert claim_containers(docker_client, claim()) == []


def test_stalled_pull_ends_within_the_idle_timeout_and_frees_the_worker(agent_factory, registry, docker_client, pushed_image, claim):
    agent = agent_factory(workers=1, UTOPIA_AGENT_PULL_IDLE_TIMEOUT="3")
    with SlowRegistry(registry, kib_per_s=0) as stalled:
        ref = stalled.ref(pushed_image.split("/", 1)[1])
        outcome = {}

        def create():
            outcome["response"] = agent.post("/api/v1/containers", json={"claim_id": claim(), "image": ref}, timeout=60)

        creator = threading.Thread(target=create)
        started = time.monotonic()
        creator.start()
        assert stalled.holding.wait(10), "the engine is downloading a layer the registry holds back"
        assert "image pull started" in agent.log()
        probe = requests.get(agent.base_url + "/health", timeout=5)
        assert probe.status_code == 200, "the one worker still answers probes while its other thread pulls"
        assert creator.is_alive(), "the probe was answered while the create waited on the pull"
        creator.join(60)
        elapsed = time.monotonic() - started
    remove_images(docker_client, [ref])
    response = outcome["response"]
    assert response.status_code == 502, response.text
    assert "no progress for 3 s" in response.json()["message"]
    assert elapsed < 30
    assert claim_containers(docker_client, claim()) == []
    assert "image pull failed" in agent.log()
    assert agent.get("/api/v1/containers").status_code == 200
