"""Claims' container disks on real engines: the allocation derived from the engine across killed
workers and restarts, the quota mode refused or in force, and sizes enforced by a btrfs engine
or by measuring on overlay2 over ext4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
import requests

from tests.support.engine import TEST_IMAGE
from tests.support.polling import wait_for
from tests.support.private_engine import running_btrfs_engine
from tests.test_events import Watch
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


# The job of a claim that writes past its disk: 64 MiB files, one every 0.2 s (about 300 MB/s),
# each followed by the kernel's uptime, which the test maps to its own clock.
WRITER = ("i=0; while [ $i -lt 32 ]; do busybox dd if=/dev/zero of=/fill$i bs=1M count=64 2>/dev/null; "
          "echo $i $(cut -d' ' -f1 /proc/uptime); i=$((i+1)); busybox usleep 200000; done; sleep 300")


def uptime_to_unix(uptime: float) -> float:
    now_uptime = float(open("/proc/uptime").read().split()[0])
    return time.time() - (now_uptime - uptime)


def test_measured_mode_stops_a_claim_past_its_disk_and_nothing_else(agent_factory, docker_client, test_image, claim, nvidia_path):
    agent = agent_factory(UTOPIA_AGENT_NETWORK_ISOLATION="off")
    watch = Watch(agent)
    try:
        other = created(agent.create(claim("other"), test_image, disk_gb=1, command=["sleep", "300"]))
        writer = created(agent.create(claim("writer"), test_image, gpu_count=1, disk_gb=1, command=["sh", "-c", WRITER]))
        gpu = agent.get(f"/api/v1/containers/{writer}").json()["gpu_ids"][0]

        stopped = wait_for(lambda: (c := agent.get(f"/api/v1/containers/{writer}").json())["status"] == "exited" and c, timeout=120)
        assert stopped and stopped["stopped"] and stopped["error"] == "disk_limit_exceeded", stopped
        exited = watch.wait(lambda changes: [c for c in changes if c["action"] == "exited" and c["object"]["id"] == writer])
        line = next(c for c in exited if c["action"] == "exited" and c["object"]["id"] == writer)
        assert line["reason"] == "disk_limit_exceeded" and line["object"]["error"] == "disk_limit_exceeded"

        # How soon: from the file that took the layer to 1 GiB (the job's own clock; the layer holds a few KiB more, so that
        # file passes the size) to the engine's stop. Stopped before that file's line, the last line bounds it from below.
        written = [line.split() for line in docker_client.containers.get(writer).logs().decode().split("\n") if line.strip()]
        past = next((float(at) for index, at in written if (int(index) + 1) * 64 >= 1024), float(written[-1][1]))
        finished = docker_client.api.inspect_container(writer)["State"]["FinishedAt"]
        stop_at = datetime.fromisoformat(finished[:26].rstrip("Z") + "+00:00").timestamp()
        print(f"measured mode: stopped {stop_at - uptime_to_unix(past):.2f} s after passing 1 GiB, after {len(written) * 64} MiB written")
        assert len(written) < 32, "stopped before it wrote its 2 GiB"

        assert agent.get(f"/api/v1/containers/{other}").json()["status"] == "running", "the other claim runs on"
        # The size it stopped at: written before the stop, or (should the shared agent of the run, which sees every
        # claim on the engine, have stopped it first) walked once more within a second of the stop. Past 1 GiB by as
        # little as a few KiB (stopped right after its 16th file), which is 1024 in whole MiB.
        stats = wait_for(lambda: (s := agent.get(f"/api/v1/containers/{writer}/stats").json())["disk_used_mb"] >= 1024 and s, timeout=10)
        assert stats and stats["disk_limit_mb"] == 1024, agent.get(f"/api/v1/containers/{writer}/stats").json()
        assert wait_for(lambda: agent.get(f"/api/v1/containers/{other}/stats").json()["disk_used_mb"] is not None, timeout=30)
        shown = next(g for g in agent.get("/api/v1/gpus").json() if g["index"] == gpu)
        assert shown["state"] in ("releasing", "free") and shown["claim_id"] in (None, claim("writer")), shown
        metrics = agent.get("/metrics").text
        assert f'utopia_agent_claim_disk_limit_bytes{{claim_id="{claim("other")}"}} 1.073741824e+09' in metrics
        assert 'utopia_agent_disk_quota_mode{mode="measured"} 1.0' in metrics
        assert created(agent.create(claim("after"), test_image, disk_gb=1, command=["sleep", "300"])), "the agent takes claims on"
        assert agent.get("/health").status_code == 200
        time.sleep(3)
        assert docker_client.api.inspect_container(writer)["State"]["Status"] == "exited", "never restarted by the engine"
        assert agent.get(f"/api/v1/containers/{writer}/stats").json()["disk_used_mb"] >= 1024, "a stopped claim keeps its layer's figure"
    finally:
        watch.close()
        agent.stop()


@pytest.fixture(scope="module")
def btrfs_engine(docker_client):
    """A private dockerd on a loop-mounted btrfs (tests/support/private_engine.py); the shared engine comes through."""
    with running_btrfs_engine(subnet="10.223") as engine:
        yield engine
    assert docker_client.ping()


def listing_of_big(logs: str) -> str | None:
    """`ls -l /big`'s line: mode, links, owner, group, size, date, name."""
    return next((line for line in logs.splitlines() if line.startswith("-") and line.rstrip().endswith(" /big")), None)


def test_engine_mode_on_btrfs_stops_a_claims_writes_at_its_size(agent_factory, btrfs_engine, claim):
    agent = agent_factory(DOCKER_HOST=btrfs_engine.base_url, UTOPIA_AGENT_DISK_QUOTA="engine", UTOPIA_AGENT_NETWORK_ISOLATION="off",
                          UTOPIA_AGENT_GPU_BACKEND="none")
    client = btrfs_engine.client
    try:
        assert node_disk(agent)["quota"] == "engine"
        other = created(agent.create(claim("other"), TEST_IMAGE, disk_gb=1, command=["sleep", "300"]))
        writer = created(agent.create(claim("writer"), TEST_IMAGE, disk_gb=1, cpus=0.5, command=[
            "sh", "-c", "busybox dd if=/dev/zero of=/big bs=1M count=2048; echo rc=$?; busybox ls -l /big; sleep 300"]))
        assert client.api.inspect_container(writer)["HostConfig"]["StorageOpt"] == {"size": str(1024 ** 3)}
        # dd's error (stderr) and ls's line (stdout) may come in either order in the log: find ls's line itself.
        logs = wait_for(lambda: "rc=" in (text := client.containers.get(writer).logs().decode()) and listing_of_big(text) and text,
                        timeout=120)
        assert logs and ("No space left on device" in logs or "Disk quota exceeded" in logs), logs
        size = int(listing_of_big(logs).split()[4])
        print(f"engine mode: the writes stopped at {size / 1024 ** 2:.0f} MiB of a 1024 MiB disk")
        assert 0.9 * 1024 ** 3 < size <= 1024 ** 3, "near 1 GiB, and never past it"
        assert agent.get(f"/api/v1/containers/{writer}").json()["status"] == "running", "the job itself runs on: only its writes fail"
        assert client.containers.get(other).exec_run(["sh", "-c", "echo ok > /note && cat /note"]).output == b"ok\n", "the other claim writes"
        assert created(agent.create(claim("after"), TEST_IMAGE, disk_gb=0.5, command=["sleep", "300"])), "the agent takes claims on"
        assert wait_for(lambda: (agent.get(f"/api/v1/containers/{writer}/stats").json()["disk_used_mb"] or 0) > 900, timeout=30)
        assert agent.get(f"/api/v1/containers/{writer}/stats").json()["disk_limit_mb"] == 1024
    finally:
        agent.stop()
