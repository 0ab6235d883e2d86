"""Engine outage and recovery, on a private dockerd (tests/support/private_engine.py) so the
shared engine is never touched."""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import pytest

from tests.support.polling import wait_for
from tests.support.private_engine import running_private_engine
from utopia_agent.api.health import TRUST_RECENT_ANSWER_SECONDS

ENGINE_TIMEOUT = 2.0
# What a 503 may take beyond the engine timeout: the request itself, and a slow CI machine.
MARGIN = 3.0


@pytest.fixture(scope="module")
def private_engine(engine):
    """The private engine with the test image, for this module's outages."""
    with running_private_engine(engine.client) as private:
        yield private


@pytest.fixture
def private_agent(agent_factory, private_engine):
    """Starts agents on the private engine with a short engine timeout; stops them after the test."""
    started = []

    def make():
        started.append(agent_factory(
            workers=2, DOCKER_HOST=private_engine.base_url, UTOPIA_AGENT_ENGINE_TIMEOUT=str(ENGINE_TIMEOUT),
        ))
        return started[-1]

    yield make
    for agent in started:
        agent.stop()


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_outage_gives_503_and_the_agent_recovers_by_itself(private_engine, private_agent, claim, test_image):
    agent = private_agent()
    created = agent.create(claim("out"), test_image, gpu_count=2, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    before = agent.get(f"/api/v1/containers/{container_id}").json()
    assert len(before["gpu_ids"]) == 2

    private_engine.stop()
    limit = ENGINE_TIMEOUT + MARGIN
    time.sleep(TRUST_RECENT_ANSWER_SECONDS)  # /health trusts an answer this recent: the outage shows after it
    for _ in range(3):  # several times, so both workers answer
        health, took = timed(lambda: agent.get("/health", auth=False))
        assert health.status_code == 503 and health.json()["status"] == "unhealthy", health.text
        assert int(health.headers["Retry-After"]) > 0 and took < limit
        for method, path, body in [
            ("GET", "/api/v1/containers", None),
            ("GET", f"/api/v1/containers/{container_id}", None),
            ("DELETE", f"/api/v1/containers/{container_id}", None),
            ("POST", "/api/v1/containers", {"claim_id": claim("down"), "image": test_image}),
        ]:
            response, took = timed(partial(agent.request, method, path, json=body))
            assert response.status_code == 503, (method, path, response.text)
            assert int(response.headers["Retry-After"]) > 0 and response.json()["message"]
            assert took < limit, (method, path, took)
        metrics = agent.get("/api/v1/metrics")
        assert metrics.status_code == 200 and len(metrics.json()["gpus"]) == 8

    private_engine.start()
    healthy = wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=limit + TRUST_RECENT_ANSWER_SECONDS)
    assert healthy, agent.log()[-3000:]
    assert agent.process.poll() is None
    listed = [c for c in agent.get("/api/v1/containers").json() if c["claim_id"] == claim("out")]
    assert [(c["id"], c["gpu_ids"], c["status"]) for c in listed] == [(container_id, before["gpu_ids"], "exited")], "the engine's restart stopped it"
    assert agent.log().count("node view not trusted") == 1, "the outage is logged once, by the one watcher"
    assert wait_for(lambda: agent.log().count("node view live") == 2, timeout=limit), "the view came back by itself"
    assert agent.get("/api/v1/containers", params={"claim_id": claim("down")}).json() == []
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204


def test_an_agent_started_without_its_engine_becomes_healthy_when_it_appears(private_engine, private_agent, claim, test_image):
    private_engine.stop()
    agent = private_agent()
    assert agent.get("/health", auth=False).status_code == 503
    assert agent.get("/api/v1/containers").status_code == 503

    private_engine.start()
    limit = ENGINE_TIMEOUT + MARGIN
    for _ in range(4):  # each worker made its engine client while the engine was down
        assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=limit), agent.log()[-3000:]
    created = agent.create(claim("late"), test_image, gpu_count=1, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    assert [c["claim_id"] for c in agent.get("/api/v1/containers").json()] == [claim("late")]
    assert agent.delete(f"/api/v1/containers/{created.json()['container_id']}").status_code == 204


def test_a_hung_engine_gives_503_within_the_engine_timeout(private_engine, private_agent, test_image):
    """A frozen dockerd accepts connections and never answers: only the timeout ends a request."""
    agent = private_agent()
    assert agent.get("/api/v1/containers").status_code == 200
    dockerd = private_engine.handle.process
    os.kill(dockerd.pid, signal.SIGSTOP)
    try:
        time.sleep(TRUST_RECENT_ANSWER_SECONDS)
        for method, path in [("GET", "/health"), ("GET", "/api/v1/containers"), ("GET", "/api/v1/containers/0123456789ab")]:
            response, took = timed(partial(agent.request, method, path))
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, (path, response.text)
            assert ENGINE_TIMEOUT * 0.9 < took < ENGINE_TIMEOUT + MARGIN, (path, took)
        metrics, took = timed(lambda: agent.get("/api/v1/metrics"))
        assert metrics.status_code == 200 and len(metrics.json()["gpus"]) == 8
        assert took < ENGINE_TIMEOUT + MARGIN, f"the metrics waited {took:.1f} s on the hung engine"
    finally:
        os.kill(dockerd.pid, signal.SIGCONT)
    assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=ENGINE_TIMEOUT + MARGIN)
    assert agent.get("/api/v1/containers").status_code == 200
