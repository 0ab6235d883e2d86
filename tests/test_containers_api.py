"""The container endpoints end to end: real gunicorn, real HTTP, and what the engine really did."""

from __future__ import annotations

import socket
import time
from datetime import datetime, UTC

import pytest
import requests

from tests.support.engine import free_host_port
from tests.support.polling import wait_for


def managed_ids(docker_client, claim_id: str) -> list[str]:
    return [c.id for c in docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim_id}"})]


def http_answer(url: str) -> list[requests.Response]:
    """The answer in a list (a response is falsy when its status is an error), empty while refused."""
    try:
        return [requests.get(url, timeout=2)]
    except requests.ConnectionError:
        return []


def test_create_runs_the_container_as_asked(agent, docker_client, test_image, claim, tmp_path):
    host_dir = agent.state_dir / "volumes" / "data"
    host_dir.mkdir()
    (host_dir / "index.html").write_text("hello from the claim\n")
    port = free_host_port()
    response = agent.create(
        claim(),
        test_image,
        command=["httpd", "-f", "-p", "8080", "-h", "/srv"],
        env_vars=["MODE=train", "EMPTY="],
        working_dir="/srv",
        volumes={str(host_dir): "/srv"},
        port_mappings=[{"host_port": port, "container_port": 8080, "protocol": "tcp"}],
    )
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    assert len(container_id) == 64
    assert response.headers["Location"].endswith(container_id)

    attrs = docker_client.api.inspect_container(container_id)
    assert attrs["State"]["Running"]
    assert attrs["Config"]["Image"] == test_image
    assert attrs["Config"]["Cmd"] == ["httpd", "-f", "-p", "8080", "-h", "/srv"]
    assert "MODE=train" in attrs["Config"]["Env"] and "EMPTY=" in attrs["Config"]["Env"]
    assert attrs["Config"]["WorkingDir"] == "/srv"
    assert attrs["Config"]["Labels"]["utopia.managed"] == "true"
    assert attrs["Config"]["Labels"]["utopia.claim_id"] == claim()
    [mount] = attrs["HostConfig"]["Mounts"]
    assert (mount["Type"], mount["Target"], mount.get("ReadOnly", False)) == ("bind", "/srv", False)
    assert mount["Source"] == str(agent.state_dir / "mounts" / claim() / "0"), "the engine mounts the agent's pin"
    assert attrs["HostConfig"]["Binds"] is None
    assert attrs["HostConfig"]["Privileged"] is False
    answered = wait_for(lambda: http_answer(f"http://127.0.0.1:{port}/index.html"), timeout=15)
    assert answered and answered[0].text == "hello from the claim\n"


def test_container_object_has_the_contract_shape(agent, test_image, claim):
    port = free_host_port()
    created = agent.create(claim(), test_image, command=["sleep", "300"], port_mappings=[{"host_port": port, "container_port": 8888}])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]

    listed = agent.get("/api/v1/containers")
    assert listed.status_code == 200
    [mine] = [c for c in listed.json() if c["id"] == container_id]
    shown = agent.get(f"/api/v1/containers/{container_id}").json()
    by_prefix = agent.get(f"/api/v1/containers/{container_id[:12]}").json()
    for obj in (mine, shown, by_prefix):
        assert set(obj) == {"id", "claim_id", "image", "status", "gpu_ids", "ports", "created", "started", "labels", "resources", "exit_code", "stopped",
            "oom_killed", "restart_count", "finished", "error"}
        assert obj["id"] == container_id
        assert obj["claim_id"] == claim()
        assert obj["image"] == test_image
        assert obj["status"] == "running"
        assert obj["gpu_ids"] == []
        assert obj["ports"] == {"8888/tcp": str(port)}
        assert isinstance(obj["created"], int) and isinstance(obj["started"], int)
        assert abs(obj["created"] - time.time()) < 120 and obj["started"] >= obj["created"]
        assert obj["labels"]["utopia.managed"] == "true"
        assert obj["resources"] == {"cpus": None, "memory_mb": None, "shm_size_mb": 8192, "cpuset": None, "disk_gb": 10.0}, \
            "no GPUs: no CPU or memory limit, the default disk"
    assert mine == shown == by_prefix

    filtered = agent.get("/api/v1/containers", params={"claim_id": claim()}).json()
    assert [c["id"] for c in filtered] == [container_id]


def test_started_is_zero_for_a_container_that_never_started(agent, docker_client, test_image, claim):
    container = docker_client.api.create_container(
        test_image, ["true"], name=f"utopia-{claim()}", labels={"utopia.managed": "true", "utopia.claim_id": claim()}
    )
    shown = agent.get(f"/api/v1/containers/{container['Id']}").json()
    assert shown["status"] == "created" and shown["started"] == 0
    # Made behind the agent's back: the list shows it once the engine's create event arrives.
    [listed] = wait_for(lambda: agent.get("/api/v1/containers", params={"claim_id": claim()}).json(), timeout=5, interval=0.05)
    assert listed["started"] == 0


def test_delete_stops_and_removes(agent, docker_client, test_image, claim):
    container_id = agent.create(claim(), test_image, command=["sleep", "300"]).json()["container_id"]
    response = agent.delete(f"/api/v1/containers/{container_id}")
    assert response.status_code == 204 and response.content == b""
    assert managed_ids(docker_client, claim()) == []
    again = agent.delete(f"/api/v1/containers/{container_id}")
    assert again.status_code == 404 and again.json()["message"]
    assert agent.get(f"/api/v1/containers/{container_id}").status_code == 404


def test_unmanaged_containers_are_invisible_and_untouched(agent, docker_client, test_image):
    stranger = docker_client.containers.run(test_image, ["sleep", "300"], detach=True, labels={"utopia-test.run": "stranger"})
    try:
        assert stranger.id not in [c["id"] for c in agent.get("/api/v1/containers").json()]
        for path in (stranger.id, stranger.id[:12]):
            assert agent.get(f"/api/v1/containers/{path}").status_code == 404
            response = agent.delete(f"/api/v1/containers/{path}")
            assert response.status_code == 404 and "message" in response.json()
        stranger.reload()
        assert stranger.status == "running"
    finally:
        stranger.remove(force=True)


@pytest.mark.parametrize("bad_id", ["nothex-nothex", "abc", "0123456789ab" * 6, "utopia-x", "..%2F..%2Fetc"])
def test_bad_or_unknown_ids_are_404(agent, bad_id):
    for method in ("GET", "DELETE"):
        response = agent.request(method, f"/api/v1/containers/{bad_id}")
        assert response.status_code == 404, (method, bad_id, response.text)
        assert response.json()["message"]


def test_second_create_for_a_claim_is_409_naming_the_first(agent, docker_client, test_image, claim):
    first = agent.create(claim(), test_image, command=["sleep", "300"])
    assert first.status_code == 201
    port = free_host_port()
    again = agent.create(claim(), "localhost:1/never/pulled:1", gpu_count=64, port_mappings=[{"host_port": port, "container_port": 80}])
    assert again.status_code == 409, again.text
    assert again.json()["container_id"] == first.json()["container_id"]
    assert again.json()["error"] == "claim_exists"
    assert managed_ids(docker_client, claim()) == [first.json()["container_id"]]


def test_host_port_held_by_a_process_is_409(agent, docker_client, test_image, claim):
    port = free_host_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        response = agent.create(claim(), test_image, command=["sleep", "300"], port_mappings=[{"host_port": port, "container_port": 80}])
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "port_taken"
    assert managed_ids(docker_client, claim()) == []


def test_host_port_held_by_another_claim_is_409(agent, docker_client, test_image, claim):
    port = free_host_port()
    mapping = [{"host_port": port, "container_port": 80}]
    first = agent.create(claim("a"), test_image, command=["sleep", "300"], port_mappings=mapping)
    assert first.status_code == 201
    second = agent.create(claim("b"), test_image, command=["sleep", "300"], port_mappings=mapping)
    assert second.status_code == 409 and second.json()["error"] == "port_taken"
    assert managed_ids(docker_client, claim("b")) == []
    udp = agent.create(claim("c"), test_image, command=["sleep", "300"], port_mappings=[{**mapping[0], "protocol": "udp"}])
    assert udp.status_code == 201, "the same number over udp is another port"


def test_start_failure_rolls_back(agent, docker_client, test_image, claim):
    response = agent.create(claim(), test_image, command=["/no/such/binary"])
    assert response.status_code == 400, response.text
    assert "no/such/binary" in response.json()["message"]
    assert managed_ids(docker_client, claim()) == []


def test_oversized_body_is_413_naming_the_limit(agent):
    response = agent.post("/api/v1/containers", json={"claim_id": "c", "image": "x", "command": ["y" * 4000] * 100})
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large" and response.json()["max_body_bytes"] == 65536
    assert "65536 bytes" in response.json()["message"] and "UTOPIA_AGENT_MAX_BODY_BYTES" in response.json()["message"]


def test_a_gpu_request_on_a_node_without_gpus_says_so(agent_factory, docker_client, test_image, claim):
    gpuless = agent_factory(workers=1, UTOPIA_AGENT_GPU_BACKEND="none")
    response = gpuless.create(claim(), test_image, gpu_count=1, command=["sleep", "300"])
    assert response.status_code == 409, response.text
    assert response.json()["message"] == "this node has no GPUs (GPU backend none)"
    assert response.json()["error"] == "no_gpus_free" and response.json()["free_gpus"] == 0
    assert managed_ids(docker_client, claim()) == []


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer wrong-token", "Token test-token-0123456789abcdef"]
)
def test_bad_tokens_are_401(agent, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in [("GET", "/api/v1/containers"), ("POST", "/api/v1/containers"), ("GET", "/api/v1/metrics"), ("DELETE",
        "/api/v1/containers/0123456789ab")]:
        response = agent.request(method, path, auth=False, headers=dict(headers))
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["message"]


def test_health_and_openapi_need_no_token(agent):
    health = agent.get("/health", auth=False)
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    assert health.json()["timestamp"].endswith("Z")
    assert agent.get("/openapi.json", auth=False).json()["openapi"].startswith("3.")


def test_request_id_is_echoed_or_made(agent):
    mine = agent.get("/health", headers={"X-Request-ID": "orchestrator-42"})
    assert mine.headers["X-Request-ID"] == "orchestrator-42"
    spaced = agent.get("/health", headers={"X-Request-ID": "claim c1 retry 2"})
    assert spaced.headers["X-Request-ID"] == "claim c1 retry 2"
    fresh = agent.get("/health", headers={"X-Request-ID": "x" * 129})
    assert fresh.headers["X-Request-ID"] not in ("", "x" * 129)
    assert "orchestrator-42" in agent.log()


def test_unknown_routes_and_methods_are_json(agent):
    missing = agent.get("/api/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found" and missing.json()["message"]
    wrong = agent.request("PUT", "/api/v1/containers")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed" and wrong.json()["message"]
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}


def _listed_ids(session, agent) -> set[str]:
    return {c["id"] for c in session.get(agent.base_url + "/api/v1/containers").json()}


def test_create_and_delete_show_at_once_on_every_worker(agent_factory, test_image, claim):
    agent = agent_factory(workers=4)
    sessions = agent.sessions()
    container_id = agent.create(claim(), test_image, command=["sleep", "300"]).json()["container_id"]
    for session in sessions:
        [listed] = [c for c in session.get(agent.base_url + "/api/v1/containers").json() if c["id"] == container_id]
        assert listed["status"] == "running" and listed["started"] > 0, "the 201 came before every worker's list showed the start"
        assert session.get(f"{agent.base_url}/api/v1/containers/{container_id}").json()["status"] == "running"
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
    for session in sessions:
        assert container_id not in _listed_ids(session, agent)
        assert session.get(f"{agent.base_url}/api/v1/containers/{container_id}").status_code == 404


def test_changes_behind_the_agents_back_reach_every_worker(agent_factory, docker_client, test_image, claim):
    """A container that dies, is started again, or is removed with the engine's own calls shows
    so in every worker's list and show, within the time the engine's events take to arrive."""
    agent = agent_factory(workers=2)
    sessions = agent.sessions(4)
    container_id = agent.create(claim(), test_image, command=["sleep", "2"]).json()["container_id"]

    def seen_everywhere(check) -> bool:
        for session in sessions:
            listed = [c for c in session.get(agent.base_url + "/api/v1/containers").json() if c["id"] == container_id]
            shown = session.get(f"{agent.base_url}/api/v1/containers/{container_id}")
            if not check(listed[0] if listed else None) or not check(shown.json() if shown.status_code == 200 else None):
                return False
        return True

    def engine_started() -> int:
        started = docker_client.api.inspect_container(container_id)["State"]["StartedAt"]
        return int(datetime.fromisoformat(started[:19]).replace(tzinfo=UTC).timestamp())

    assert wait_for(lambda: seen_everywhere(lambda c: c and c["status"] == "exited"), timeout=10,
        interval=0.05), "a container that exits on its own shows as exited"
    first_start = engine_started()
    docker_client.api.start(container_id)
    assert engine_started() > first_start
    assert wait_for(lambda: seen_everywhere(lambda c: c and c["started"] == engine_started()), timeout=5,
        interval=0.05), "started again behind the agent's back"
    docker_client.api.remove_container(container_id, force=True)
    assert wait_for(lambda: seen_everywhere(lambda c: c is None), timeout=5, interval=0.05), "removed behind the agent's back"


def test_a_container_that_never_exited_reports_no_outcome(agent, test_image, claim):
    created = agent.create(claim(), test_image, command=["sleep", "300"])
    shown = agent.get(f"/api/v1/containers/{created.json()['container_id']}").json()
    assert (shown["exit_code"], shown["oom_killed"], shown["restart_count"], shown["finished"], shown["error"]) == (None, False, 0, 0, "")
