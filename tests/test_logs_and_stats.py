"""A claim's logs, usage and Prometheus series, end to end on the real engine and cgroups."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import requests

from tests.conftest import TEST_DEFAULT_MEMORY_MB
from tests.support.polling import wait_for
from tests.support.relay import INSPECT
from tests.support.scrape import sample, scrape
from utopia_agent.claims.records import CLAIM_LABEL, MANAGED_LABEL
from utopia_agent.config import Config
from utopia_agent.engine.manager import DockerManager
from utopia_agent.node.claim_usage import CgroupFiles, ClaimUsage

MIB = 1024 * 1024
TICKER = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.5; done"]


def created(response) -> str:
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def logs(agent, container_id: str, **params) -> requests.Response:
    return agent.get(f"/api/v1/containers/{container_id}/logs", params=params)


def logged(agent, container_id: str, text: str, timeout: float = 30) -> str:
    """The whole log once `text` is in it."""
    found = wait_for(lambda: text in (body := logs(agent, container_id, tail=10000).text) and body, timeout)
    assert found, logs(agent, container_id).text
    return found


def follow(agent, container_id: str) -> requests.Response:
    """A followed log, read as it streams, on a connection of its own."""
    response = requests.get(
        f"{agent.base_url}/api/v1/containers/{container_id}/logs",
        params={"follow": "true", "tail": "0"},
        headers={"Authorization": f"Bearer {agent.token}"},
        stream=True,
        timeout=30,
    )
    return response


def stamped_time(line: str) -> float:
    """The Unix time of a line the engine stamped (RFC 3339 with nanoseconds)."""
    stamp = line.split(" ", 1)[0]
    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


# --- logs ----------------------------------------------------------------------------------


def test_logs_return_what_the_command_printed(agent, test_image, claim):
    script = "for i in 1 2 3 4 5; do echo out$i; done; sleep 1; echo oops >&2; sleep 300"
    container_id = created(agent.create(claim(), test_image, command=["sh", "-c", script]))
    body = logged(agent, container_id, "oops")
    assert body.splitlines() == ["out1", "out2", "out3", "out4", "out5", "oops"], "stdout and stderr, in order"
    response = logs(agent, container_id, tail=2)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text.splitlines() == ["out5", "oops"]
    assert logs(agent, container_id, tail=0).text == ""
    by_prefix = logs(agent, container_id[:12])
    assert by_prefix.text == body


def test_since_cuts_the_logs_at_a_time(agent, test_image, claim):
    container_id = created(agent.create(claim(), test_image, command=["sh", "-c", "echo early; sleep 3; echo late; sleep 300"]))
    logged(agent, container_id, "late")
    stamped = logs(agent, container_id, timestamps="true").text.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["early", "late"]
    early = stamped_time(stamped[0])
    assert abs(early - time.time()) < 120
    assert logs(agent, container_id, since=early + 1.5).text.splitlines() == ["late"]
    assert logs(agent, container_id, since=int(early) - 1).text.splitlines() == ["early", "late"]
    for from_the_start in ("0", "0.0", "1.175494351e-38"):
        assert logs(agent, container_id, since=from_the_start).text.splitlines() == ["early", "late"]


def test_follow_streams_new_lines_and_ends_at_the_limit(agent_factory, test_image, claim):
    agent = agent_factory(workers=1, UTOPIA_AGENT_LOG_FOLLOW_SECONDS="4")
    container_id = created(agent.create(claim(), test_image, command=TICKER))
    started = time.monotonic()
    with follow(agent, container_id) as response:
        assert response.status_code == 200
        lines = [line.decode() for line in response.iter_lines() if line]
    elapsed = time.monotonic() - started
    assert 3.5 <= elapsed < 30, elapsed
    assert len(lines) >= 3, lines
    numbers = [int(line.removeprefix("tick")) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "each new line once, in order"


def test_follow_ends_when_the_container_stops(agent, test_image, claim):
    container_id = created(agent.create(claim(), test_image, restart_policy="no", command=["sh", "-c", "sleep 1; echo first; sleep 2; echo last"]))
    started = time.monotonic()
    with follow(agent, container_id) as response:
        text = b"".join(response.iter_content(None)).decode()
    assert "last" in text
    assert time.monotonic() - started < 60, "well before the follow limit (300 s)"


def test_a_third_follower_in_a_worker_is_429_and_health_stays_up(agent_factory, test_image, claim):
    agent = agent_factory(workers=1, UTOPIA_AGENT_LOG_FOLLOW_SECONDS="60")
    container_id = created(agent.create(claim(), test_image, command=TICKER))
    followers = [follow(agent, container_id) for _ in range(2)]
    try:
        for response in followers:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith(b"tick"), "both are streaming"
        third = follow(agent, container_id)
        assert third.status_code == 429, third.text
        assert third.json()["error"] == "too_many_followers" and third.headers["Retry-After"]
        started = time.monotonic()
        assert agent.get("/health", auth=False).status_code == 200
        assert agent.get("/api/v1/containers").status_code == 200
        assert time.monotonic() - started < 5
        assert logs(agent, container_id).status_code == 200, "reading without follow is never limited"

        followers.pop().close()  # the worker notices at its next write and frees the slot
        freed = wait_for(lambda: (r := follow(agent, container_id)).status_code == 200 and r, 15, 0.5)
        assert freed, "a follower that went away gives its slot back"
        followers.append(freed)
    finally:
        for response in followers:
            response.close()


@pytest.mark.parametrize(
    "params,field",
    [({"tail": "10001"}, "tail"), ({"tail": "-1"}, "tail"), ({"tail": "all"}, "tail"), ({"since": "yesterday"}, "since"),
     ({"follow": "maybe"}, "follow"), ({"timestamps": "2"}, "timestamps"), ({"lines": "5"}, "lines")],
)
def test_bad_log_parameters_are_400(agent, test_image, claim, params, field):
    container_id = created(agent.create(claim(), test_image, command=["sleep", "300"]))
    response = logs(agent, container_id, **params)
    assert response.status_code == 400, response.text
    assert field in response.json()["errors"]


def test_logs_and_stats_of_unknown_or_unmanaged_containers_are_404(agent, docker_client, test_image):
    stranger = docker_client.containers.run(test_image, ["sleep", "300"], detach=True)
    try:
        for container_id in ("0123456789ab", stranger.id, stranger.id[:12], "nothex"):
            for what in ("logs", "stats"):
                response = agent.get(f"/api/v1/containers/{container_id}/{what}")
                assert response.status_code == 404, (what, container_id, response.text)
                assert response.json()["message"]
    finally:
        stranger.remove(force=True)


# --- stats and Prometheus ---------------------------------------------------------------


def test_stats_come_from_the_cgroup_and_nvml(agent, docker_client, test_image, claim, nvidia_path):
    busy = ["sh", "-c", "x=$(yes | head -c 20000000); while :; do :; done"]  # holds ~20 MB and a CPU
    container_id = created(agent.create(claim(), test_image, gpu_count=1, cpus=0.5, memory_mb=128, command=busy))
    gpu = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"][0]
    time.sleep(1.5)
    stats = wait_for(lambda: (s := agent.get(f"/api/v1/containers/{container_id}/stats").json())["cpu_percent"] > 5 and s, 20, 0.5)
    assert stats, agent.get(f"/api/v1/containers/{container_id}/stats").json()
    assert stats["cpu_percent"] <= 65, "held to cpus=0.5 by its quota"
    assert stats["memory_limit_mb"] == 128
    assert 15 < stats["memory_used_mb"] < 128
    assert stats["gpus"] == [{"id": gpu, "uuid": f"GPU-00000000-0000-0000-0000-{gpu:012d}", "memory_used_mb": 0, "usage_percent": 0.0}]

    docker_client.api.stop(container_id, timeout=1)
    stopped = agent.get(f"/api/v1/containers/{container_id}/stats").json()
    assert (stopped["cpu_percent"], stopped["memory_used_mb"], stopped["memory_limit_mb"]) == (0.0, 0, 128)


def test_stats_of_a_claim_without_gpus_show_its_default_limit(agent, test_image, claim):
    container_id = created(agent.create(claim(), test_image, command=["sleep", "300"]))
    stats = agent.get(f"/api/v1/containers/{container_id}/stats").json()
    assert stats["memory_limit_mb"] == int(TEST_DEFAULT_MEMORY_MB) and stats["gpus"] == [] and stats["memory_used_mb"] >= 0


def test_usage_finds_a_new_claims_cgroup_by_its_id_without_an_inspect(relay, monkeypatch, docker_client, test_image, claim, tmp_path):
    """One inspect (the first container's main process) tells where the engine puts cgroups; a
    burst of new claims then costs none each, and each lands on its own cgroup."""
    monkeypatch.setenv("DOCKER_HOST", relay.base_url)
    manager = DockerManager(Config(token="-", state_dir=tmp_path, engine_timeout=10, network_isolation=False))
    try:
        ids = []
        for i in range(3):
            labels = {MANAGED_LABEL: "true", CLAIM_LABEL: claim(str(i))}
            ids.append(docker_client.api.create_container(test_image, ["sleep", "300"], name=f"utopia-{claim(str(i))}", labels=labels)["Id"])
            docker_client.api.start(ids[-1])
        usage = ClaimUsage(manager, tmp_path)
        inspects = len(relay.calls(INSPECT))
        assert all(usage.now(container_id, 0)[0] is not None for container_id in ids)
        assert len(relay.calls(INSPECT)) - inspects == 1
        for container_id in ids:
            assert usage._cgroup(container_id) == CgroupFiles.of_pid(docker_client.api.inspect_container(container_id)["State"]["Pid"])
        docker_client.api.stop(ids[1], timeout=0)
        usage_of_stopped, _ = usage.now(ids[1], 0)
        assert usage_of_stopped is None
    finally:
        manager.close()


def test_prometheus_has_per_claim_series_sampled_in_the_background(agent, test_image, claim, nvidia_path):
    busy = ["sh", "-c", "while :; do :; done"]
    container_id = created(agent.create(claim(), test_image, gpu_count=1, cpus=0.2, memory_mb=64, command=busy))
    gpu = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"][0]

    def claim_sampled():
        families = scrape(agent)
        try:
            return sample(families, "utopia_agent_claim_cpu_seconds_total", claim_id=claim()) > 0 and families
        except KeyError:
            return False

    families = wait_for(claim_sampled, 30, 1)
    assert families, "the sampler runs every few seconds"
    assert sample(families, "utopia_agent_claim_memory_limit_bytes", claim_id=claim()) == 64 * MIB
    assert 0 < sample(families, "utopia_agent_claim_memory_used_bytes", claim_id=claim()) < 64 * MIB
    assert sample(families, "DCGM_FI_DEV_GPU_TEMP", gpu=str(gpu))
    [temp] = [s for s in families["DCGM_FI_DEV_GPU_TEMP"] if s.labels["gpu"] == str(gpu)]
    assert temp.labels["claim_id"] == claim(), "the GPU series name the claim that holds the GPU"

    samples_file = agent.state_dir / "claim-usage.json"
    written = samples_file.stat().st_mtime
    first = sample(scrape(agent), "utopia_agent_claim_cpu_seconds_total", claim_id=claim())
    second = sample(scrape(agent), "utopia_agent_claim_cpu_seconds_total", claim_id=claim())
    if samples_file.stat().st_mtime == written:
        assert first == second, "a scrape serves the last sample; it never reads the cgroups itself"
