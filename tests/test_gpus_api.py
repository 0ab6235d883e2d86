"""GPUs end to end: the stand-in NVML under gunicorn, exclusive allocation, and the engine's NVIDIA path."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.fake_nvml import DEFAULT_TEST_GPUS
from tests.support.polling import wait_for

# Every GPU create goes through the engine's NVIDIA device path: these tests need the stand-in hook.
pytestmark = pytest.mark.usefixtures("nvidia_path")

UUIDS = [gpu.uuid for gpu in DEFAULT_TEST_GPUS]
LOST_GPU = 6
HEALTHY_GPUS = [i for i in range(8) if i != LOST_GPU]


def gpu_labels(docker_client, prefix: str) -> dict[str, tuple[list[int], list[str]]]:
    """claim -> (gpu ids, gpu uuids), as the engine's labels say: from one list call, since the
    SDK's `containers.list` inspects each row and fails on one a rolled-back create removed meanwhile."""
    found = {}
    for row in docker_client.api.containers(all=True, filters={"label": "utopia.managed=true"}):
        labels = row.get("Labels") or {}
        claim_id = labels["utopia.claim_id"]
        if claim_id.startswith(prefix):
            ids = [int(i) for i in labels.get("utopia.gpu_ids", "").split(",") if i]
            uuids = [u for u in labels.get("utopia.gpu_uuids", "").split(",") if u]
            found[claim_id] = (ids, uuids)
    return found


def assert_exclusive(docker_client, prefix: str) -> set[int]:
    held: list[int] = []
    for ids, uuids in gpu_labels(docker_client, prefix).values():
        assert [UUIDS[i] for i in ids] == uuids
        held.extend(ids)
    assert len(held) == len(set(held)), f"a GPU is in two containers: {sorted(held)}"
    assert LOST_GPU not in held
    return set(held)


def visible_devices(docker_client, container_id: str) -> list[str]:
    """NVIDIA_VISIBLE_DEVICES of the main process: the engine sets it in the process spec.

    The environment is read until it is there: a read that races the container's first
    moments can come back empty, which says nothing about the variable."""

    def environ() -> list[bytes]:
        exec_id = docker_client.api.exec_create(container_id, ["cat", "/proc/1/environ"])["Id"]
        return [e for e in docker_client.api.exec_start(exec_id).split(b"\0") if b"=" in e]

    entries = wait_for(environ, timeout=10)
    assert entries, "the container's /proc/1/environ stayed empty"
    values = [e.split(b"=", 1)[1].decode() for e in entries if e.startswith(b"NVIDIA_VISIBLE_DEVICES=")]
    return values[0].split(",") if values else []


def test_metrics_report_every_gpu_including_odd_ones(agent):
    response = agent.get("/api/v1/metrics")
    assert response.status_code == 200
    body = response.json()
    gpus = {g["id"]: g for g in body["gpus"]}
    assert sorted(gpus) == list(range(8))
    assert gpus[0]["uuid"] == UUIDS[0] and gpus[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert gpus[0]["memory_total_mb"] == 81559 and gpus[0]["temperature_c"] == 30
    assert gpus[3]["temperature_c"] is None and gpus[3]["healthy"] is True
    assert gpus[LOST_GPU]["healthy"] is False
    assert set(body["system"]) == {"cpu_usage_percent", "memory_usage_percent", "memory_total_mb", "memory_used_mb", "disk_usage_percent",
        "load_average", "uptime"}
    assert body["cpu_usage_percent"] == body["system"]["cpu_usage_percent"]
    assert body["system"]["uptime"] > 0 and body["node_id"]


def test_gpus_are_attached_through_the_nvidia_device_path(agent, docker_client, test_image, claim):
    response = agent.create(claim(), test_image, gpu_count=2, command=["sleep", "300"])
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    shown = agent.get(f"/api/v1/containers/{container_id}").json()
    assert len(shown["gpu_ids"]) == 2
    assert visible_devices(docker_client, container_id) == [UUIDS[i] for i in shown["gpu_ids"]]
    request = docker_client.api.inspect_container(container_id)["HostConfig"]["DeviceRequests"][0]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]]
    assert request["DeviceIDs"] == [UUIDS[i] for i in shown["gpu_ids"]]
    busy = {g["id"] for g in agent.get("/api/v1/metrics").json()["gpus"] if g["busy"]}
    assert busy == set(shown["gpu_ids"]) | {LOST_GPU}, "busy means not free: held, or lost"
    agent.delete(f"/api/v1/containers/{container_id}")
    assert {g["id"] for g in agent.get("/api/v1/metrics").json()["gpus"] if g["busy"]} == {LOST_GPU}


def test_close_gpus_are_preferred(agent, test_image, claim):
    first = agent.create(claim("a"), test_image, gpu_count=1, command=["sleep", "300"]).json()["container_id"]
    pair = agent.create(claim("b"), test_image, gpu_count=2, command=["sleep", "300"]).json()["container_id"]
    assert agent.get(f"/api/v1/containers/{first}").json()["gpu_ids"] == [0]
    assert agent.get(f"/api/v1/containers/{pair}").json()["gpu_ids"] == [2, 3], "a pair on one PCIe switch beats 1+2"


def test_too_few_free_gpus_is_409_and_leaves_nothing(agent, docker_client, test_image, claim):
    everything = agent.create(claim("all"), test_image, gpu_count=len(HEALTHY_GPUS), command=["sleep", "300"])
    assert everything.status_code == 201, everything.text
    assert sorted(agent.get(f"/api/v1/containers/{everything.json()['container_id']}").json()["gpu_ids"]) == HEALTHY_GPUS
    refused = agent.create(claim("more"), test_image, gpu_count=1, command=["sleep", "300"])
    assert refused.status_code == 409
    assert refused.json()["error"] == "no_gpus_free" and refused.json()["free_gpus"] == 0
    assert claim("more") not in gpu_labels(docker_client, claim(""))
    docker_client.containers.get(everything.json()["container_id"]).remove(force=True)
    again = agent.create(claim("again"), test_image, gpu_count=len(HEALTHY_GPUS), command=["sleep", "300"])
    assert again.status_code == 201, "a container removed behind the agent's back frees its GPUs"


def test_a_lost_gpu_is_never_given(agent, test_image, claim):
    response = agent.create(claim(), test_image, gpu_count=8, command=["sleep", "300"])
    assert response.status_code == 409
    assert response.json()["free_gpus"] == len(HEALTHY_GPUS)


@pytest.mark.parametrize("name", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA"])
def test_gpu_selecting_env_vars_are_refused(agent, docker_client, test_image, claim, name):
    response = agent.create(claim(), test_image, gpu_count=1, env_vars=[f"{name}=all"])
    assert response.status_code == 403, response.text
    assert name in response.json()["message"] and "env_vars" in response.json()["errors"]
    assert gpu_labels(docker_client, claim()) == {}


def test_double_allocation_is_reported(agent, docker_client, test_image, claim):
    labels = {"utopia.managed": "true", "utopia.gpu_ids": "7", "utopia.gpu_uuids": UUIDS[7]}
    for suffix in ("x", "y"):
        docker_client.api.create_container(test_image, ["true"], name=f"utopia-{claim(suffix)}", labels={**labels, "utopia.claim_id": claim(suffix)})
    # Made behind the agent's back, they count once their events are in the node view (a few ms).
    assert wait_for(lambda: {claim("x"), claim("y")} <= {c["claim_id"] for c in agent.get("/api/v1/containers").json()}, timeout=10)
    response = agent.create(claim("z"), test_image, gpu_count=1, command=["sleep", "300"])
    assert response.status_code == 201
    assert 7 not in agent.get(f"/api/v1/containers/{response.json()['container_id']}").json()["gpu_ids"]
    assert "gpu allocated twice" in agent.log()


def _plans(prefix: str, count: int, seed: int) -> dict[str, int]:
    """Claim id -> the GPUs it asks for, the same for the same seed."""
    rng = random.Random(seed)
    return {f"{prefix}{i}": rng.choice([0, 1, 1, 2, 3]) for i in range(count)}


def _burst(agent, test_image, prefix: str, count: int, seed: int) -> dict[str, requests.Response | Exception]:
    plans = _plans(prefix, count, seed).items()

    def create(plan):
        claim_id, gpus = plan
        try:
            with agent.new_client() as client:
                return claim_id, client.send(
                    "POST", "/api/v1/containers",
                    # 1 GB of disk each, so the GPUs' disk shares (which fill the node's disk) never decide.
                    json={"claim_id": claim_id, "image": test_image, "gpu_count": gpus, "command": ["sleep", "300"], "disk_gb": 1},
                    timeout=120,
                )
        except requests.RequestException as exc:
            return claim_id, exc

    with ThreadPoolExecutor(max_workers=12) as pool:
        return dict(pool.map(create, plans))


def test_concurrent_creates_never_share_a_gpu(agent_factory, docker_client, test_image, claim):
    agent = agent_factory(workers=4)
    results = _burst(agent, test_image, claim(""), 24, seed=1)
    plans = _plans(claim(""), 24, seed=1)
    created = gpu_labels(docker_client, claim(""))
    for claim_id, response in results.items():
        assert response.status_code in (201, 409), response.text
        if response.status_code == 409:
            # A claim without GPUs fits only into what no claim holds; GPU claims never wait on those.
            expected = "no_gpus_free" if plans[claim_id] else "not_enough_resources"
            assert response.json()["error"] == expected and claim_id not in created, response.text
        else:
            assert claim_id in created
    assert assert_exclusive(docker_client, claim("")) == set(HEALTHY_GPUS), "the burst should use every GPU"
    for container in agent.get("/api/v1/containers").json():
        if container["claim_id"].startswith(claim("")) and container["gpu_ids"]:
            assert agent.delete(f"/api/v1/containers/{container['id']}").status_code == 204
    # Its own disk size: a GPU claim's default share of the disk (all of it, for every GPU) would not fit
    # beside the disks the claims without GPUs still hold.
    refill = agent.create(claim("refill"), test_image, gpu_count=len(HEALTHY_GPUS), disk_gb=1, command=["sleep", "300"])
    assert refill.status_code == 201, "freed GPUs are given again"


def test_killed_workers_never_double_allocate(agent_factory, docker_client, test_image, claim):
    agent = agent_factory(workers=4)
    killed: list[int] = []

    def kill_workers():
        for _ in range(3):
            time.sleep(0.4)
            pids = agent.worker_pids()
            if pids:
                killed.append(random.choice(pids))
                os.kill(killed[-1], signal.SIGKILL)

    killer = threading.Thread(target=kill_workers)
    killer.start()
    results = _burst(agent, test_image, claim(""), 30, seed=2)
    killer.join()
    assert killed
    respawned = wait_for(lambda: len(agent.worker_pids()) == 4 and not set(killed) & set(agent.worker_pids()), timeout=30)
    assert respawned, f"gunicorn replaced the killed workers {killed}: now {agent.worker_pids()}"
    assert agent.get("/health").status_code == 200
    assert_exclusive(docker_client, claim(""))
    created = gpu_labels(docker_client, claim(""))
    for claim_id, response in results.items():
        if isinstance(response, requests.Response) and response.status_code == 409 and response.json()["error"] == "no_gpus_free":
            assert claim_id not in created
    listed = {c["claim_id"]: c["gpu_ids"] for c in agent.get("/api/v1/containers").json() if c["claim_id"].startswith(claim(""))}
    assert listed == {claim_id: ids for claim_id, (ids, _) in created.items()}


def test_restarted_agent_knows_every_claim(agent_factory, docker_client, test_image, claim):
    first = agent_factory(workers=2)
    ids = {}
    for suffix, gpus in (("a", 2), ("b", 1), ("c", 0)):
        response = first.create(claim(suffix), test_image, gpu_count=gpus, command=["sleep", "300"])
        assert response.status_code == 201, response.text
        ids[response.json()["container_id"]] = first.get(f"/api/v1/containers/{response.json()['container_id']}").json()["gpu_ids"]
    first.stop()
    second = agent_factory(workers=2)
    listed = {c["id"]: c["gpu_ids"] for c in second.get("/api/v1/containers").json() if c["claim_id"].startswith(claim(""))}
    assert listed == ids
    busy = {g["id"] for g in second.get("/api/v1/metrics").json()["gpus"] if g["busy"]}
    assert busy == {i for gpus in ids.values() for i in gpus} | {LOST_GPU}
    more = second.create(claim("d"), test_image, gpu_count=len(HEALTHY_GPUS) - 3, command=["sleep", "300"])
    assert more.status_code == 201
    assert assert_exclusive(docker_client, claim("")) == set(HEALTHY_GPUS)


def test_gpus_are_told_apart_by_uuid_after_renumbering(agent, docker_client, test_image, claim):
    """After a reboot NVML may renumber GPUs; a container labelled index 4 that holds GPU 3's UUID holds GPU 3."""
    labels = {"utopia.managed": "true", "utopia.claim_id": claim("old"), "utopia.gpu_ids": "4", "utopia.gpu_uuids": UUIDS[3]}
    docker_client.api.create_container(test_image, ["true"], name=f"utopia-{claim('old')}", labels=labels)
    # Made behind the agent's back, it counts once its event is in the node view (a few ms).
    assert wait_for(lambda: claim("old") in {c["claim_id"] for c in agent.get("/api/v1/containers").json()}, timeout=10)
    refused = agent.create(claim("all"), test_image, gpu_count=len(HEALTHY_GPUS), command=["sleep", "300"])
    assert refused.status_code == 409 and refused.json()["free_gpus"] == len(HEALTHY_GPUS) - 1
    rest = agent.create(claim("rest"), test_image, gpu_count=len(HEALTHY_GPUS) - 1, command=["sleep", "300"])
    assert rest.status_code == 201, rest.text
    given = agent.get(f"/api/v1/containers/{rest.json()['container_id']}").json()["gpu_ids"]
    assert 3 not in given and 4 in given



def test_deleting_the_old_lock_file_mid_burst_never_shares_a_gpu(agent_factory, docker_client, test_image, claim):
    """An operator (or a tenant who reached the state dir) deletes and replaces `allocations.lock`
    while creates race: the lock is the state dir itself, so every GPU still has one holder."""
    agent = agent_factory(workers=4)
    lock_file = agent.state_dir / "allocations.lock"
    stop = threading.Event()

    def vandal():
        while not stop.is_set():
            lock_file.unlink(missing_ok=True)
            lock_file.touch()
            time.sleep(0.005)

    thread = threading.Thread(target=vandal)
    thread.start()
    try:
        results = _burst(agent, test_image, claim(""), 16, seed=3)
    finally:
        stop.set()
        thread.join()
    assert all(isinstance(r, requests.Response) and r.status_code in (201, 409) for r in results.values()), results
    assert assert_exclusive(docker_client, claim("")) == set(HEALTHY_GPUS)


def test_a_container_the_engine_makes_after_its_creator_died_is_waited_for_and_removed(docker_client, test_image, claim, tmp_path):
    """What the next holder of the allocation lock does with a create cut short: the engine may make
    the container a moment after its worker died; it is waited for and removed, and a name the
    engine never makes is given up on once the wait is over."""
    from utopia_agent.config import Config
    from utopia_agent.engine.manager import DockerManager

    manager = DockerManager(Config(token="-", state_dir=tmp_path, engine_timeout=10))
    name = f"utopia-{claim('late')}"
    late = threading.Timer(0.5, lambda: docker_client.api.create_container(
        test_image, ["sleep", "60"], name=name, labels={"utopia.managed": "true", "utopia.claim_id": claim("late")}))
    try:
        late.start()
        started = time.monotonic()
        assert manager.remove_if_created(name, wait_seconds=10)
        assert 0.4 < time.monotonic() - started < 10 and not docker_client.containers.list(all=True, filters={"name": f"^/{name}$"})
        started = time.monotonic()
        assert not manager.remove_if_created(f"utopia-{claim('never')}", wait_seconds=0.5)
        assert time.monotonic() - started >= 0.5
    finally:
        late.join()
        manager.close()
        for leftover in docker_client.containers.list(all=True, filters={"name": name}):
            leftover.remove(force=True)
