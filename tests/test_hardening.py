"""What a tenant's container may not do, and what a crash or a careless operator may not break."""

from __future__ import annotations

import os
import threading

import pytest

from tests.support.polling import wait_for
from utopia_agent.allocation.allocator import allocation_lock
from utopia_agent.engine.container_config import DROPPED_CAPABILITIES
from utopia_agent.errors import AllocationBusy

# Bit numbers in /proc/<pid>/status CapEff (linux/capability.h).
CAPABILITY_BITS = {"CHOWN": 0, "KILL": 5, "SETPCAP": 8, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31}


def test_containers_drop_needless_capabilities_and_never_gain_privileges(agent, docker_client, test_image, claim):
    response = agent.create(claim(), test_image, command=["sh", "-c", "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; sleep 300"])
    assert response.status_code == 201, response.text
    container = docker_client.containers.get(response.json()["container_id"])
    wait_for(lambda: b"NoNewPrivs" in container.logs(), timeout=20)
    status = dict(line.split(":\t") for line in container.logs().decode().splitlines())
    effective = int(status["CapEff"], 16)
    for name in DROPPED_CAPABILITIES:
        assert not effective & (1 << CAPABILITY_BITS[name]), f"{name} is still effective"
    assert effective & (1 << CAPABILITY_BITS["CHOWN"]) and effective & (1 << CAPABILITY_BITS["KILL"]), "a job keeps what it needs"
    assert status["NoNewPrivs"] == "1"


@pytest.mark.usefixtures("nvidia_path")
def test_a_container_created_but_never_started_is_removed_and_frees_its_gpus(agent_factory, docker_client, test_image, claim):
    """A worker that died between create and start leaves a created container holding GPUs."""
    agent = agent_factory(workers=2, UTOPIA_AGENT_UNSTARTED_SECONDS="2", gpus=None)
    every_gpu = agent.get("/api/v1/metrics").json()["gpus"]
    healthy = [g for g in every_gpu if g["uuid"] and g["name"]]
    labels = {
        "utopia.managed": "true", "utopia.claim_id": claim("orphan"),
        "utopia.gpu_ids": ",".join(str(g["id"]) for g in healthy), "utopia.gpu_uuids": ",".join(g["uuid"] for g in healthy),
    }
    orphan = docker_client.api.create_container(test_image, ["sleep", "300"], name=f"utopia-{claim('orphan')}", labels=labels)["Id"]
    # Made behind the agent's back, it counts once its event is in the node view (a few ms).
    assert wait_for(lambda: orphan in {c["id"] for c in agent.get("/api/v1/containers").json()}, timeout=10)
    blocked = agent.create(claim("blocked"), test_image, gpu_count=1, command=["sleep", "300"])
    assert blocked.status_code == 409, "the orphan holds every GPU until it is swept"
    wait_for(lambda: not docker_client.containers.list(all=True, filters={"id": orphan}, ignore_removed=True), timeout=40)
    assert "removing a container that never started" in agent.log()
    assert agent.create(claim("after"), test_image, gpu_count=1, command=["sleep", "300"]).status_code == 201


def test_removing_files_of_the_state_dir_lets_no_second_holder_in(tmp_path):
    """The lock is the state dir itself: deleting what lies in it (an old lock file, say) changes nothing."""
    (tmp_path / "allocations.lock").touch()
    held, release = threading.Event(), threading.Event()

    def holder():
        with allocation_lock(tmp_path, timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(5)
        for entry in tmp_path.iterdir():
            os.unlink(entry)
        with pytest.raises(AllocationBusy):
            with allocation_lock(tmp_path, timeout=0.3):
                pass
    finally:
        release.set()
        thread.join()
    with allocation_lock(tmp_path, timeout=1):
        pass

