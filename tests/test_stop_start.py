"""Stopping a claim frees its GPUs and ports and keeps its container; starting it takes them back.

On a real engine under gunicorn: another claim gets what a stopped one held, a start is refused
while anything of it is held elsewhere or the node drains, and a stopped claim stays stopped
through an engine restart (its own engine, so the shared one is never restarted) and SIGKILLed
workers.
"""

from __future__ import annotations


import pytest
import requests

from tests.support.engine import free_host_port
from tests.support.polling import wait_for
from tests.test_claim_volumes import recorded
from tests.test_events import of_container

pytestmark = pytest.mark.usefixtures("nvidia_path")
ALL_GPUS = 7  # of the stand-in's 8, GPU 6 is lost
# GPU claims get their share of the node's disk unless they ask (a stopped one keeps it): 1 GB each here.
# Writes a file into the container's writable layer once, and keeps running.
KEEPS_A_FILE = ["sh", "-c", "[ -f /kept ] || echo first-run > /kept; sleep 300"]


def gpus_of(agent, claim_id):
    return {gpu["uuid"] for gpu in agent.get("/api/v1/gpus").json() if gpu["claim_id"] == claim_id}


def answered(agent, path):
    """The JSON of a 200, or None while the agent's workers are down or coming back."""
    try:
        response = agent.get(path)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


def created(agent, claim_id, image, **fields):
    response = agent.create(claim_id, image, **fields)
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def test_a_stopped_claim_frees_its_gpus_and_port_and_starts_again_once_they_are_free(agent, docker_client, test_image, claim):
    port = free_host_port()
    mapping = [{"host_port": port, "container_port": 8080}]
    since = int(agent.get("/api/v1/node").headers["X-Utopia-Revision"])
    first = created(agent, claim("a"), test_image, gpu_count=ALL_GPUS, disk_gb=1, port_mappings=mapping, command=KEEPS_A_FILE)
    docker_client.containers.get(first).exec_run(["sh", "-c", "echo written-before-stop >> /kept"])

    stopped = agent.post(f"/api/v1/containers/{first}/stop")
    assert stopped.status_code == 200, stopped.text
    body = stopped.json()
    assert (body["stopped"], body["status"], body["error"]) == (True, "exited", "")
    assert len(body["gpu_ids"]) == ALL_GPUS, "it shows the GPUs it will take back"
    attrs = docker_client.api.inspect_container(first)
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "no", "the engine never starts it on its own"
    assert gpus_of(agent, claim("a")) == set()

    second = created(agent, claim("b"), test_image, gpu_count=ALL_GPUS, disk_gb=1, port_mappings=mapping, command=["sleep", "300"])
    assert len(gpus_of(agent, claim("b"))) == ALL_GPUS, "another claim got the stopped claim's GPUs"
    refused = agent.post(f"/api/v1/containers/{first}/start")
    assert refused.status_code == 409, refused.text
    assert (refused.json()["error"], refused.json()["claim_id"]) == ("no_gpus_free", claim("b"))
    assert agent.get(f"/api/v1/containers/{first}").json()["stopped"] is True, "a refused start leaves it stopped"

    assert agent.delete(f"/api/v1/containers/{second}").status_code == 204
    started = agent.post(f"/api/v1/containers/{first}/start")
    assert started.status_code == 200, started.text
    assert (started.json()["status"], started.json()["stopped"]) == ("running", False)
    assert docker_client.containers.get(first).exec_run(["cat", "/kept"]).output == b"first-run\nwritten-before-stop\n"
    assert len(gpus_of(agent, claim("a"))) == ALL_GPUS
    assert docker_client.api.inspect_container(first)["HostConfig"]["RestartPolicy"]["Name"] == "no", "the policy it was made with"
    again = agent.post(f"/api/v1/containers/{first}/start")
    assert (again.status_code, again.json()["status"]) == (200, "running"), "a start of a running claim answers it as it is"

    changes = wait_for(lambda: (c := [x for x in recorded(agent) if x["revision"] > since]) and len(of_container(c, first)) >= 5 and c, timeout=30)
    actions = [action for action, _, _ in of_container(changes, first)]
    assert actions == ["created", "started", "exited", "stopped", "started"], actions


def test_a_port_held_by_another_claim_refuses_the_start(agent, test_image, claim):
    port = free_host_port()
    mapping = [{"host_port": port, "container_port": 8080}]
    first = created(agent, claim("a"), test_image, port_mappings=mapping, command=["sleep", "300"])
    assert agent.post(f"/api/v1/containers/{first}/stop").status_code == 200
    created(agent, claim("b"), test_image, port_mappings=mapping, command=["sleep", "300"])
    refused = agent.post(f"/api/v1/containers/{first}/start")
    assert (refused.status_code, refused.json()["error"], refused.json()["host_port"]) == (409, "port_taken", port), refused.text


def test_a_draining_node_refuses_a_start_and_an_unknown_id_is_404(agent, test_image, claim):
    first = created(agent, claim(), test_image, command=["sleep", "300"])
    assert agent.post(f"/api/v1/containers/{first}/stop").status_code == 200
    assert agent.post("/api/v1/node/drain", json={"reason": "maintenance"}).status_code == 200
    try:
        refused = agent.post(f"/api/v1/containers/{first}/start")
        assert (refused.status_code, refused.json()["error"]) == (409, "node_draining"), refused.text
    finally:
        assert agent.delete("/api/v1/node/drain").status_code == 200
    assert agent.post(f"/api/v1/containers/{first}/start").status_code == 200
    for action in ("stop", "start"):
        assert agent.post(f"/api/v1/containers/{'0' * 64}/{action}").status_code == 404
