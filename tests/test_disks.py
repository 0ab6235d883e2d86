"""Claims' container disks on real engines: the allocation derived from the engine across killed
workers and restarts, the quota mode refused or in force, and sizes enforced by a btrfs engine
or by measuring on overlay2 over ext4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from tests.support.polling import wait_for
from utopia_agent.claims.disks import gb_of


def filesystem_gb(path: str) -> float:
    stat = os.statvfs(path)
    return gb_of(stat.f_blocks * stat.f_frsize)


def leaving_gb(docker_client, allocatable: float) -> str:
    """UTOPIA_AGENT_RESERVED_DISK_GB that leaves claims `allocatable` GB of the engine's data root."""
    return f"{filesystem_gb(docker_client.info()['DockerRootDir']) - allocatable:.1f}"


def created(response: requests.Response) -> str:
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def node_disk(agent) -> dict:
    return agent.get("/api/v1/node").json()["disk"]


def retried_create(agent, *args, **fields) -> requests.Response:
    """A create sent until a worker answers it (workers come back after a SIGKILL)."""
    answers: list[requests.Response] = []

    def answered() -> bool:
        try:
            answers.append(agent.create(*args, **fields))
        except requests.RequestException:
            return False
        return answers[-1].status_code not in (502, 503)

    assert wait_for(answered, timeout=60), answers[-1].text if answers else "no answer"
    return answers[-1]


def test_the_disk_allocation_survives_killed_workers_and_a_restart(agent_factory, docker_client, test_image, claim):
    agent = agent_factory(UTOPIA_AGENT_RESERVED_DISK_GB=leaving_gb(docker_client, 3.0), UTOPIA_AGENT_NETWORK_ISOLATION="off")
    try:
        first = created(agent.create(claim("a"), test_image, disk_gb=2, command=["sleep", "300"]))
        assert agent.get(f"/api/v1/containers/{first}").json()["resources"]["disk_gb"] == 2.0
        assert node_disk(agent) == {"quota": "measured", "allocatable_gb": 3.0, "allocated_gb": 2.0, "free_gb": 1.0, "pressure": False}
        for pid in agent.worker_pids():
            os.kill(pid, signal.SIGKILL)
        refused = retried_create(agent, claim("b"), test_image, disk_gb=1.5, command=["sleep", "300"])
        assert refused.status_code == 409 and refused.json()["free_disk_gb"] == 1.0, refused.text
        assert docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim('b')}"}) == [], "nothing left behind"

        agent.stop()
        agent.start()
        assert node_disk(agent)["allocated_gb"] == 2.0
        second = created(agent.create(claim("b"), test_image, disk_gb=1, command=["sleep", "300"]))
        assert node_disk(agent)["free_gb"] == 0.0
        assert agent.delete(f"/api/v1/containers/{first}").status_code == 204
        assert node_disk(agent)["allocated_gb"] == 1.0
        assert agent.delete(f"/api/v1/containers/{second}").status_code == 204
    finally:
        agent.stop()


def test_engine_mode_refuses_to_start_where_the_engine_cannot_enforce_sizes(agent_factory, docker_client, test_image):
    """overlay2 on ext4 (this machine's engines) takes no size: UTOPIA_AGENT_DISK_QUOTA=engine stops the agent and `check` fails."""
    assert docker_client.info()["Driver"] == "overlay2"
    agent = agent_factory(UTOPIA_AGENT_DISK_QUOTA="engine", UTOPIA_AGENT_NETWORK_ISOLATION="off", start=False)
    with open(agent.log_path, "wb") as log:
        started = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], env=agent.env, stdout=log, stderr=subprocess.STDOUT,
            timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    assert started.returncode == 2
    assert "UTOPIA_AGENT_DISK_QUOTA=engine, but the engine does not enforce container disk sizes: the engine's overlay2 sits on extfs" in agent.log()

    checked = subprocess.run([sys.executable, "-m", "utopia_agent.cli", "check"], env=agent.env, capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 and "UTOPIA_AGENT_DISK_QUOTA=engine" in checked.stderr
    measured = subprocess.run([sys.executable, "-m", "utopia_agent.cli", "check"], env={**agent.env, "UTOPIA_AGENT_DISK_QUOTA": "auto"},
                              capture_output=True, text=True, timeout=60)
    assert "disk: quota measured (the engine's overlay2 sits on extfs" in measured.stdout, measured.stdout + measured.stderr
