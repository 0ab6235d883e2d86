"""GPU health end to end: driver events, dirty GPUs, a hung NVML, quarantine and drain, through the
running agent on the real engine, with the stand-in NVML scripted while the agent runs."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import requests

from tests.fake_nvml import (
    DEFAULT_TEST_GPUS,
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    fake_gpu,
    hung_nvml,
    inject_event,
    write_fake_nvml_config,
)
from tests.support.polling import wait_for
from utopia_agent.events.history import EventHistory
from tests.support.scrape import sample, scrape
from tests.test_gpus_api import _burst, assert_exclusive, gpu_labels

UUIDS = [gpu.uuid for gpu in DEFAULT_TEST_GPUS]
LOST_GPU = 6
HEALTHY = 7
# Long enough for the stand-in's events, samples (1 s) and counters (5 s) on a slow machine.
SETTLE = 20


def gpus(agent) -> dict[int, dict]:
    response = agent.get("/api/v1/gpus")
    assert response.status_code == 200, response.text
    return {gpu["index"]: gpu for gpu in response.json()}


def wait_for_gpu(agent, index: int, state: str, timeout: float = SETTLE) -> dict:
    """The GPU once it shows `state` (the last view when it never does, so the assert says why)."""
    last = {}

    def check():
        last.update(gpus(agent)[index])
        return last["state"] == state

    wait_for(check, timeout)
    assert last["state"] == state, last
    return last


def script(agent, **changes: dict) -> None:
    """Rewrite the stand-in's scenario: the default GPUs, with `gpu<index>={field: value}` changes."""
    scenario = [replace(gpu, **changes.get(f"gpu{i}", {})) for i, gpu in enumerate(DEFAULT_TEST_GPUS)]
    write_fake_nvml_config(agent.nvml_config, scenario)


def watching_events(agent) -> None:
    """Events raised before the node's watcher made its event set are not delivered (as with the driver)."""
    assert wait_for(lambda: "watching NVML events on 7 GPUs" in agent.log(), SETTLE), agent.log()[-2000:]


def holder_of(docker_client, prefix: str, index: int) -> set[str]:
    return {claim for claim, (ids, _) in gpu_labels(docker_client, prefix).items() if index in ids}


def test_a_critical_xid_quarantines_once_and_an_application_xid_does_not(agent_factory, test_image, claim):
    agent = agent_factory(workers=3)
    watching_events(agent)
    inject_event(agent.nvml_config, UUIDS[1], EVENT_XID, 13)
    assert wait_for(lambda: gpus(agent)[1]["xid_events"], SETTLE), "the application's Xid is recorded"
    inject_event(agent.nvml_config, UUIDS[2], EVENT_XID, 79)
    quarantined = wait_for_gpu(agent, 2, "quarantined")
    assert quarantined["reason"] == "Xid 79"
    assert [event["code"] for event in quarantined["xid_events"]] == [79], "three workers, one record"
    after_13 = gpus(agent)[1]
    assert after_13["state"] == "free" and [event["code"] for event in after_13["xid_events"]] == [13]
    assert abs(after_13["xid_events"][0]["time"] - time.time()) < 60
    refused = agent.create(claim(), test_image, gpu_count=HEALTHY, command=["sleep", "300"])
    assert refused.status_code == 409 and refused.json()["free_gpus"] == HEALTHY - 1
    families = scrape(agent)
    assert sample(families, "DCGM_FI_DEV_XID_ERRORS", gpu="2") == 79
    assert sample(families, "DCGM_FI_DEV_XID_ERRORS", gpu="1") == 13
    assert sample(families, "DCGM_FI_DEV_XID_ERRORS", gpu="0") == 0
    assert sample(families, "utopia_agent_gpus", state="quarantined") == 1
    assert agent.log().count("Xid 79: quarantined") == 1


def test_double_bit_ecc_quarantines_from_an_event_or_the_counters(agent_factory):
    agent = agent_factory(workers=2)
    watching_events(agent)
    inject_event(agent.nvml_config, UUIDS[4], EVENT_DOUBLE_BIT_ECC)
    assert wait_for_gpu(agent, 4, "quarantined")["reason"] == "double-bit ECC error"
    script(agent, gpu5={"ecc_dbe": 2}, gpu7={"retired_pending": 1})
    assert wait_for_gpu(agent, 5, "quarantined")["reason"] == "double-bit ECC errors (2)"
    assert wait_for_gpu(agent, 7, "quarantined")["reason"] == "retired pages pending: reset the GPU"
    families = scrape(agent)
    assert sample(families, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu="5") == 2
    assert sample(families, "DCGM_FI_DEV_RETIRED_PENDING", gpu="7") == 1

    assert agent.delete(f"/api/v1/gpus/{UUIDS[5]}/quarantine").json()["state"] == "free"
    time.sleep(7)  # a counters read (every 5 s) and a health check (every 1 s) later
    assert gpus(agent)[5]["state"] == "free", "the operator acknowledged these errors"
    script(agent, gpu5={"ecc_dbe": 3}, gpu7={"retired_pending": 1})
    assert wait_for_gpu(agent, 5, "quarantined")["reason"] == "double-bit ECC errors (3)", "a further error quarantines again"


@pytest.mark.usefixtures("nvidia_path")
def test_the_operator_quarantines_and_releases_but_not_under_a_claim(agent, docker_client, test_image, claim):
    created = agent.create(claim("a"), test_image, gpu_count=1, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    [index] = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"]
    uuid = UUIDS[index]
    try:
        held = agent.post(f"/api/v1/gpus/{uuid}/quarantine", json={"reason": "fan noise"})
        assert held.status_code == 200, held.text
        assert held.json() | {"xid_events": []} == {
            "index": index, "uuid": uuid, "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": DEFAULT_TEST_GPUS[index].pci_bus_id,
            "numa_node": DEFAULT_TEST_GPUS[index].numa, "state": "quarantined", "claim_id": claim("a"), "reason": "fan noise", "xid_events": [],
        }
        refused = agent.delete(f"/api/v1/gpus/{uuid}/quarantine")
        assert refused.status_code == 409 and refused.json()["error"] == "gpu_held" and refused.json()["claim_id"] == claim("a")
        assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
        assert gpus(agent)[index]["state"] == "quarantined" and gpus(agent)[index]["claim_id"] is None
        everything = agent.create(claim("b"), test_image, gpu_count=HEALTHY, command=["sleep", "300"])
        assert everything.status_code == 409 and everything.json()["free_gpus"] == HEALTHY - 1
        released = agent.delete(f"/api/v1/gpus/{uuid}/quarantine")
        assert released.status_code == 200 and released.json()["state"] == "free" and released.json()["reason"] is None
        assert agent.create(claim("c"), test_image, gpu_count=HEALTHY, command=["sleep", "300"]).status_code == 201
    finally:
        agent.delete(f"/api/v1/gpus/{uuid}/quarantine")


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/api/v1/gpus/GPU-no-such-gpu/quarantine", {"reason": "x"}, 404),
    ("DELETE", "/api/v1/gpus/GPU-no-such-gpu/quarantine", None, 404),
    ("POST", f"/api/v1/gpus/{UUIDS[0]}/quarantine", {}, 400),
    ("POST", f"/api/v1/gpus/{UUIDS[0]}/quarantine", {"reason": "  "}, 400),
    ("POST", f"/api/v1/gpus/{UUIDS[0]}/quarantine", {"reason": "x", "until": 3}, 400),
    ("POST", "/api/v1/node/drain", {"reason": ""}, 400),
    ("POST", "/api/v1/node/drain", ["maintenance"], 400),
])
def test_bad_health_requests_are_refused_and_change_nothing(agent, method, path, body, status):
    response = agent.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] in ("gpu_not_found", "invalid_request")
    assert not any(gpu["state"] == "quarantined" for gpu in gpus(agent).values())
    assert agent.get("/api/v1/node").json()["drain"]["draining"] is False


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/gpus"), ("POST", f"/api/v1/gpus/{UUIDS[0]}/quarantine"), ("DELETE", f"/api/v1/gpus/{UUIDS[0]}/quarantine"),
    ("GET", "/api/v1/node"), ("POST", "/api/v1/node/drain"), ("DELETE", "/api/v1/node/drain"),
])
def test_health_endpoints_need_the_token(agent, method, path):
    response = agent.request(method, path, auth=False, json={"reason": "x"})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")


def test_quarantine_and_drain_survive_a_restart(agent_factory, test_image, claim):
    agent = agent_factory(workers=2)
    assert agent.post(f"/api/v1/gpus/{UUIDS[3]}/quarantine", json={"reason": "flaky"}).status_code == 200
    assert agent.post("/api/v1/node/drain", json={"reason": "kernel upgrade"}).json()["draining"] is True
    agent.stop()
    agent.start()
    restarted = gpus(agent)[3]
    assert restarted["state"] == "quarantined" and restarted["reason"] == "flaky"
    drain = agent.get("/api/v1/node").json()["drain"]
    assert drain["draining"] is True and drain["reason"] == "kernel upgrade" and drain["since"] <= time.time()
    refused = agent.create(claim(), test_image)
    assert refused.status_code == 409 and refused.json() | {"message": ""} == {"error": "node_draining", "reason": "kernel upgrade", "message": ""}


@pytest.mark.usefixtures("nvidia_path")
def test_a_released_gpu_is_releasing_until_nvml_shows_it_clean(agent_factory, test_image, claim):
    agent = agent_factory(workers=1)
    created = agent.create(claim("job"), test_image, gpu_count=1, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    [index] = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"]
    script(agent, **{f"gpu{index}": {"compute_processes": 1, "memory_used_mib": 30000}})
    assert wait_for(
        lambda: gpus(agent)[index]["state"] == "allocated" and agent.get("/api/v1/metrics").json()["gpus"][index]["memory_used_mb"] == 30000, SETTLE
    )
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
    releasing = gpus(agent)[index]
    assert releasing["state"] == "releasing" and releasing["reason"] == "compute processes are running"
    assert agent.get("/api/v1/metrics").json()["gpus"][index]["busy"] is True
    refused = agent.create(claim("all"), test_image, gpu_count=HEALTHY, command=["sleep", "300"])
    assert refused.status_code == 409 and refused.json()["free_gpus"] == HEALTHY - 1
    script(agent, **{f"gpu{index}": {"compute_processes": 0, "memory_used_mib": 30000}})
    assert wait_for(lambda: gpus(agent)[index]["reason"] == "30000 MiB of memory still in use", SETTLE), "the process is gone, its memory not"
    script(agent)
    wait_for_gpu(agent, index, "free")
    assert agent.create(claim("all2"), test_image, gpu_count=HEALTHY, command=["sleep", "300"]).status_code == 201


@pytest.mark.usefixtures("nvidia_path")
def test_a_gpu_still_dirty_after_the_release_time_is_quarantined_and_recovers_once_clean(agent_factory, test_image, claim):
    agent = agent_factory(workers=2, UTOPIA_AGENT_GPU_RELEASE_SECONDS="2")
    created = agent.create(claim("leaky"), test_image, gpu_count=1, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    [index] = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"]
    script(agent, **{f"gpu{index}": {"memory_used_mib": 20000}})
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
    quarantined = wait_for_gpu(agent, index, "quarantined")
    # The claim is named when the node's watcher saw it hold the dirty GPU before the delete.
    assert quarantined["reason"].startswith("stray processes: 20000 MiB of memory still in use 2 s after "), quarantined
    script(agent)
    wait_for_gpu(agent, index, "free")
    assert "gpu recovered" in agent.log()


@pytest.mark.usefixtures("nvidia_path")
def test_a_compute_process_of_no_claim_blocks_its_gpu(agent_factory, test_image, claim):
    agent = agent_factory(workers=1)
    script(agent, gpu0={"compute_processes": 1})
    assert wait_for_gpu(agent, 0, "releasing")["claim_id"] is None
    refused = agent.create(claim("all"), test_image, gpu_count=HEALTHY, command=["sleep", "300"])
    assert refused.status_code == 409 and refused.json()["free_gpus"] == HEALTHY - 1
    rest = agent.create(claim("rest"), test_image, gpu_count=HEALTHY - 1, command=["sleep", "300"])
    assert rest.status_code == 201, rest.text
    assert 0 not in agent.get(f"/api/v1/containers/{rest.json()['container_id']}").json()["gpu_ids"]


@pytest.mark.usefixtures("nvidia_path")
def test_a_hung_nvml_makes_health_503_quickly_and_only_gpu_creates_wait(agent_factory, test_image, claim):
    agent = agent_factory(workers=2, UTOPIA_AGENT_NVML_TIMEOUT="1")
    with hung_nvml(agent.nvml_config):
        assert wait_for(lambda: agent.get("/health", timeout=2).status_code == 503, SETTLE)
        for _ in range(6):  # every worker says so, each at once
            started = time.monotonic()
            health = agent.get("/health", auth=False, timeout=2)
            assert time.monotonic() - started < 1.0
            assert health.status_code == 503 and health.json()["reason"].startswith("NVML is hung: ")
            assert health.headers["Retry-After"]
        started = time.monotonic()
        metrics = agent.get("/api/v1/metrics", timeout=2)
        assert time.monotonic() - started < 1.0
        assert metrics.json()["gpus_stale"] is True and len(metrics.json()["gpus"]) == 8, "the last good sample"
        assert metrics.json()["gpus"][0]["temperature_c"] == 30
        assert len(agent.get("/api/v1/gpus", timeout=2).json()) == 8
        refused = agent.create(claim("gpu"), test_image, gpu_count=1, command=["sleep", "300"])
        assert refused.status_code == 503 and refused.json()["error"] == "nvml_hung" and refused.headers["Retry-After"]
        assert agent.create(claim("cpu"), test_image, command=["sleep", "300"]).status_code == 201
        assert sample(scrape(agent), "utopia_agent_nvml_hung") == 1
    assert wait_for(lambda: all(agent.get("/health").status_code == 200 for _ in range(4)), SETTLE)
    assert agent.get("/api/v1/metrics").json()["gpus_stale"] is False
    assert agent.create(claim("gpu2"), test_image, gpu_count=1, command=["sleep", "300"]).status_code == 201
    assert "NVML answered again" in agent.log(), agent.log()[-4000:]


def test_a_draining_node_refuses_creates_and_stays_healthy(agent_factory, test_image, claim):
    agent = agent_factory(workers=2)
    before = agent.create(claim("before"), test_image, command=["sleep", "300"])
    assert before.status_code == 201
    drained = agent.post("/api/v1/node/drain", json={"reason": "maintenance window"})
    assert drained.status_code == 200 and drained.json()["draining"] is True
    for gpu_count in (0, 1):
        refused = agent.create(claim(f"during{gpu_count}"), test_image, gpu_count=gpu_count)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "node_draining" and refused.json()["reason"] == "maintenance window"
    retried = agent.create(claim("before"), test_image, command=["sleep", "300"])
    assert retried.json()["error"] == "claim_exists", "a retry of a claim that exists learns its container"
    for _ in range(4):
        health = agent.get("/health", auth=False)
        assert health.status_code == 200 and health.json()["draining"] is True
    assert sample(scrape(agent), "utopia_agent_node_draining") == 1
    assert agent.delete(f"/api/v1/containers/{before.json()['container_id']}").status_code == 204, "everything else works"
    resumed = agent.delete("/api/v1/node/drain")
    assert resumed.status_code == 200 and resumed.json() == {"draining": False, "reason": None, "since": None}
    assert agent.get("/health", auth=False).json()["draining"] is False
    assert agent.create(claim("after"), test_image, command=["sleep", "300"]).status_code == 201


@pytest.mark.usefixtures("nvidia_path")
def test_a_gpu_quarantined_mid_burst_is_never_given_after(agent_factory, docker_client, test_image, claim):
    """16 creates race across 4 workers; GPU 7 is quarantined while they run. Any container holding
    it must have been created before the quarantine answered."""
    agent = agent_factory(workers=4)
    target = 7
    results = {}
    burst = threading.Thread(target=lambda: results.update(_burst(agent, test_image, claim(""), 16, seed=4)))
    burst.start()
    try:
        assert wait_for(lambda: len(gpu_labels(docker_client, claim(""))) >= 2, 60)
        assert agent.post(f"/api/v1/gpus/{UUIDS[target]}/quarantine", json={"reason": "mid-burst"}).status_code == 200
        held_when_quarantined = holder_of(docker_client, claim(""), target)
    finally:
        burst.join()
    assert all(isinstance(r, requests.Response) and r.status_code in (201, 409) for r in results.values()), results
    assert_exclusive(docker_client, claim(""))
    assert holder_of(docker_client, claim(""), target) <= held_when_quarantined
    for container in agent.get("/api/v1/containers").json():
        if container["claim_id"].startswith(claim("")):
            assert agent.delete(f"/api/v1/containers/{container['id']}").status_code == 204
    refill = agent.create(claim("refill"), test_image, gpu_count=HEALTHY, command=["sleep", "300"])
    assert refill.status_code == 409 and refill.json()["free_gpus"] == HEALTHY - 1


def test_the_node_endpoint_describes_the_node(agent_factory, docker_client):
    scenario = [fake_gpu(0, nvlink_peers=(1,) * 4), fake_gpu(1, nvlink_peers=(0,) * 4), fake_gpu(2), fake_gpu(3, lost=True), fake_gpu(4)]
    agent = agent_factory(workers=1, gpus=scenario)
    node = agent.get("/api/v1/node").json()
    assert node["driver_version"] == "550.54.15" and node["cuda_driver_version"] == "12.4" and node["nvml_version"] == "12.550.54.15"
    assert node["engine_version"].startswith(docker_client.version()["Version"])
    assert node["gpu_backend"] == "nvml" and node["nvml_hung"] is None and node["drain"]["draining"] is False
    assert node["cpu_count"] >= 1 and node["memory_total_mb"] > 0 and node["agent_version"] and node["node_id"]
    assert all(numa["cpus"] for numa in node["numa_nodes"])
    assert [(g["index"], g["compute_capability"], g["numa_node"]) for g in node["gpus"]] == [(0, "9.0", 0), (1, "9.0", 0), (2, "9.0", 0), (3, None,
        None), (4, "9.0", 1)]
    assert node["gpus"][2]["pci_bus_id"] == "00000000:38:00.0"
    assert node["topology"] == [
        ["X", "NV4", "PXB", None, "SYS"],
        ["NV4", "X", "PXB", None, "SYS"],
        ["PXB", "PXB", "X", None, "SYS"],
        [None, None, None, "X", None],
        ["SYS", "SYS", "SYS", None, "X"],
    ]


def _flock_holder(path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks."""
    inode = path.stat().st_ino
    for line in open("/proc/locks"):
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
            return int(fields[4])
    return None


def test_when_the_watching_worker_dies_another_takes_over(agent_factory):
    agent = agent_factory(workers=2)
    watching_events(agent)
    leader = _flock_holder(agent.state_dir / "gpu-monitor.lock")
    assert leader in agent.worker_pids()
    os.kill(leader, signal.SIGKILL)
    assert wait_for(lambda: agent.log().count("watching NVML events on 7 GPUs") == 2, SETTLE), "a second worker watches"
    assert _flock_holder(agent.state_dir / "gpu-monitor.lock") not in (None, leader)
    inject_event(agent.nvml_config, UUIDS[0], EVENT_XID, 48)
    assert [event["code"] for event in wait_for_gpu(agent, 0, "quarantined")["xid_events"]] == [48]


def test_an_nvml_hung_from_the_start_shows_in_health_and_passes(agent_factory):
    agent = agent_factory(workers=1, start=False, UTOPIA_AGENT_NVML_TIMEOUT="1")
    with hung_nvml(agent.nvml_config):
        agent.start()
        assert wait_for(lambda: agent.get("/health", timeout=2).status_code == 503, SETTLE), "once nvmlInit is overdue"
        assert agent.get("/health", timeout=2).json()["reason"].startswith("NVML is hung: nvmlInit")
        assert agent.get("/api/v1/gpus").json() == [] and agent.get("/api/v1/metrics").json()["gpus_stale"] is True
    assert wait_for(lambda: agent.get("/health").status_code == 200, SETTLE)
    assert len(gpus(agent)) == 8, agent.log()[-4000:]


def test_gpu_holders_are_derived_once_per_listing_and_again_for_a_new_one(tmp_path):
    """Metrics polled while nothing changes reuse the holders of the view's listing (the same tuple
    until a change); a new listing is derived afresh, and a caller's own listing is used as given.
    While the view is not trusted, the holders come from the engine's list of GPU holders alone."""
    from types import SimpleNamespace

    from utopia_agent.gpus.health import GpuHealth
    from utopia_agent.claims.records import Holdings

    def held(claim: str, uuid: str) -> SimpleNamespace:
        labels = {"utopia.claim_id": claim, "utopia.gpu_ids": "0", "utopia.gpu_uuids": uuid}
        return SimpleNamespace(holdings=Holdings.from_labels(labels, claim))

    listing = SimpleNamespace(containers=(held("first", "GPU-a"),), trusted=True)
    listing.list_managed = lambda: listing.containers
    listing.view = SimpleNamespace(snapshot=lambda: object() if listing.trusted else None)
    listing.holders_of = lambda label: [held("from-the-engine", "GPU-z").holdings]
    health = GpuHealth(tmp_path, sampler=None, docker=listing, lock=threading.Lock, release_seconds=1, history=EventHistory(tmp_path, 10))
    before = health.listed_holders()
    assert health.listed_holders() is before and dict(before) == {"GPU-a": "first"}
    listing.containers = (*listing.containers, held("second", "GPU-b"))
    assert dict(health.listed_holders()) == {"GPU-a": "first", "GPU-b": "second"}
    assert dict(health.listed_holders((held("third", "GPU-c"),))) == {"GPU-c": "third"}
    listing.trusted = False
    listing.list_managed = None  # listing every container would inspect each one
    assert dict(health.listed_holders()) == {"GPU-z": "from-the-engine"}
