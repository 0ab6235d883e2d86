"""utopia_agent.client against the real agent: typed records, error classes, retries, idempotent creates."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.support.agent import ROOT
from tests.support.engine import free_host_port, free_port
from tests.support.polling import wait_for
from utopia_agent import client as agent_client
from utopia_agent import errors as server_errors
from utopia_agent.client import (
    AgentClient,
    AgentUnreachable,
    ClaimExists,
    Container,
    Created,
    EngineUnavailable,
    ForbiddenByPolicy,
    InvalidRequest,
    NodeDraining,
    NoGpusFree,
    NotFound,
    PortMapping,
    PortTaken,
    Unauthorized,
)


def _server_error_classes() -> list[type[server_errors.AgentError]]:
    classes, pending = [], [server_errors.AgentError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def test_the_client_imports_neither_flask_nor_docker():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, utopia_agent.client; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert not [name for name in loaded if name.split(".")[0] in ("flask", "docker")]


@pytest.mark.parametrize("server_class", _server_error_classes(), ids=lambda cls: cls.code)
def test_every_error_code_of_the_server_has_its_own_class(server_class):
    client_class = agent_client.ERRORS_BY_CODE[server_class.code]
    assert client_class.status == server_class.status
    assert client_class.retryable == (server_class.status in (429, 503))


@pytest.mark.parametrize("row", server_errors.ERROR_CODES, ids=lambda row: row.code)
def test_each_row_of_the_table_gives_both_sides_a_class_with_its_fields(row):
    body = {"error": row.code, "message": "m", **{field: f"{field}-value" for field in row.fields}}
    error = agent_client.ERRORS_BY_CODE[row.code](row.status, body)
    assert (type(error).__name__, type(error).__module__) == (row.client, "utopia_agent.client.errors")
    assert getattr(agent_client, row.client) is type(error)
    assert [getattr(error, field) for field in row.fields] == [f"{field}-value" for field in row.fields]
    server_class = server_errors.SERVER_CLASSES[row.code]
    assert (server_class.__name__, server_class.status, server_class.code) == (row.server, row.status, row.code)
    if row.family:
        assert issubclass(server_class, server_errors.SERVER_CLASSES[row.family])
        assert isinstance(error, agent_client.ERRORS_BY_CODE[row.family])


def test_an_unknown_code_is_raised_as_the_class_of_its_status():
    answer = requests.Response()
    answer.status_code, answer.headers["X-Request-ID"] = 409, "r1"
    answer._content = json.dumps({"error": "some_future_conflict", "message": "a claim holds it", "claim_id": "c1"}).encode()
    error = agent_client.error_from_response(answer)
    assert type(error) is agent_client.Conflict
    assert (error.error, error.body["claim_id"], error.request_id) == ("some_future_conflict", "c1", "r1")


@pytest.mark.usefixtures("nvidia_path")
def test_containers_come_back_as_typed_records(agent, test_image, claim):
    port = free_host_port()
    with agent.new_client() as client:
        created = client.create(
            claim(), test_image, gpu_count=2, command=["sleep", "300"],
            port_mappings=[{"host_port": port, "container_port": 8080}],
        )
        assert isinstance(created, Created) and not created.existing and len(created.container_id) == 64
        [listed] = client.list(claim_id=claim())
        shown = client.get(created.container_id[:12])
        assert isinstance(shown, Container) and shown == listed
        assert shown.status == "running" and len(shown.gpu_ids) == 2 and shown.ports == {"8080/tcp": str(port)}
        assert shown.port_mappings == {PortMapping(port, 8080, "tcp")}
        assert client.find(claim()) == shown and client.find(claim("none")) is None
        metrics = client.metrics()
        assert len(metrics.gpus) == 8 and sum(g.busy for g in metrics.gpus) >= 2
        assert metrics.system.memory_total_mb > 0
        assert client.health().healthy
        client.delete(created.container_id)
        with pytest.raises(NotFound) as missing:
            client.get(created.container_id)
        assert missing.value.status_code == 404 and missing.value.message and missing.value.request_id


@pytest.mark.usefixtures("nvidia_path")
def test_a_create_sent_again_returns_the_claims_container(agent, docker_client, test_image, claim):
    """The retry after a lost answer: the same spec gets the container the first call made."""
    spec = {"gpu_count": 1, "command": ["sleep", "300"], "port_mappings": [PortMapping(free_host_port(), 80)]}
    with agent.new_client() as client:
        first = client.create(claim(), test_image, **spec)
        again = client.create(claim(), test_image, **spec)
    assert again == Created(first.container_id, existing=True)
    assert [c.id for c in docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim()}"})] == [first.container_id]


@pytest.mark.usefixtures("nvidia_path")
@pytest.mark.parametrize("change", ["gpu_count", "port_mappings", "image"])
def test_a_create_of_another_spec_raises_claim_exists(agent, test_image, claim, change):
    spec = {"image": test_image, "gpu_count": 1, "command": ["sleep", "300"]}
    other = {**spec, change: {
        "gpu_count": 2,
        "port_mappings": [PortMapping(free_host_port(), 80)],
        "image": test_image.rsplit(":", 1)[0] + ":another-tag",
    }[change]}
    with agent.new_client() as client:
        first = client.create(claim(), **spec)
        with pytest.raises(ClaimExists) as exists:
            client.create(claim(), **other)
    assert exists.value.container_id == first.container_id and exists.value.claim_id == claim()


@pytest.mark.usefixtures("nvidia_path")
def test_errors_carry_the_fields_of_the_body(agent, test_image, claim):
    port = free_host_port()
    with agent.new_client() as client:
        with pytest.raises(NoGpusFree) as no_gpus:
            client.create(claim("many"), test_image, gpu_count=64)
        assert no_gpus.value.requested == 64

        def free_in_metrics():
            return sum(gpu.healthy and not gpu.busy for gpu in client.metrics().gpus)

        # The shared agent learns of the previous test's removals from the engine's events, so
        # its metrics may lag the allocator's live read by a moment; they must agree once settled.
        assert wait_for(lambda: free_in_metrics() == no_gpus.value.free_gpus, timeout=10)
        with pytest.raises(InvalidRequest) as invalid:
            client.create(claim("bad"), test_image, working_dir="relative")
        assert list(invalid.value.errors) == ["working_dir"]
        with pytest.raises(ForbiddenByPolicy):
            client.create(claim("env"), test_image, env_vars=["NVIDIA_VISIBLE_DEVICES=all"])
        client.create(claim("port"), test_image, command=["sleep", "300"], port_mappings=[PortMapping(port, 80)])
        with pytest.raises(PortTaken) as taken:
            client.create(claim("twin"), test_image, command=["sleep", "300"], port_mappings=[PortMapping(port, 81)])
        assert taken.value.host_port == port and not taken.value.retryable
    with AgentClient(agent.base_url, token="wrong") as wrong, pytest.raises(Unauthorized):
        wrong.list()


def test_503_is_retried_after_retry_after_and_then_raised(agent_factory, tmp_path):
    down = agent_factory(workers=1, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock", UTOPIA_AGENT_ENGINE_TIMEOUT="2")
    with down.new_client(retries=1) as client:
        started = time.monotonic()
        with pytest.raises(EngineUnavailable) as unavailable:
            client.list()
        took = time.monotonic() - started
    assert unavailable.value.retry_after == 5 and unavailable.value.retryable
    assert took >= 5, "waited Retry-After once"
    lines = [json.loads(line) for line in down.log().splitlines() if line.startswith("{")]
    assert [e["status"] for e in lines if e.get("request_id") == unavailable.value.request_id] == [503, 503]


def test_a_refused_connection_is_retried_a_bounded_number_of_times():
    with AgentClient(f"http://127.0.0.1:{free_port()}", token="t", retries=2, max_retry_wait=0.2) as client:
        started = time.monotonic()
        with pytest.raises(AgentUnreachable):
            client.list()
    assert time.monotonic() - started >= 0.4, "two waits of at most 0.2 s"


def test_logs_and_stats_of_a_container(agent, test_image, claim):
    with agent.new_client() as client:
        done = client.create(claim("done"), test_image, command=["sh", "-c", "echo one; echo two"])
        assert wait_for(lambda: client.get(done.container_id).status == "exited", timeout=30)
        assert client.logs(done.container_id, tail=1) == "two\n"
        assert "".join(client.follow_logs(done.container_id)) == "one\ntwo\n", "the stream ends with the container"
        running = client.create(claim("running"), test_image, command=["sleep", "300"])
        stats = client.stats(running.container_id)
        assert stats.memory_used_mb is not None and stats.gpus == []


def test_gpus_can_be_quarantined_and_released(agent_factory, test_image):
    node = agent_factory(workers=1)
    with node.new_client() as client:
        gpus = client.gpus()
        assert [g.index for g in gpus] == list(range(8))
        target = next(g for g in gpus if g.state == "free")
        client.quarantine(target.uuid, "test: bad fan")
        quarantined = next(g for g in client.gpus() if g.uuid == target.uuid)
        assert quarantined.state == "quarantined" and quarantined.reason == "test: bad fan"
        client.release(target.uuid)
        assert next(g for g in client.gpus() if g.uuid == target.uuid).state == "free"


def test_a_draining_node_refuses_creates_until_resumed(agent_factory, test_image, claim):
    node = agent_factory(workers=1)
    with node.new_client() as client:
        assert client.node()
        client.drain("test: maintenance")
        assert client.health().draining
        with pytest.raises(NodeDraining):
            client.create(claim(), test_image, command=["sleep", "300"])
        client.resume()
        assert not client.health().draining
        assert not client.create(claim(), test_image, command=["sleep", "300"]).existing
