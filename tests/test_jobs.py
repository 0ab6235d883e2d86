"""Claims that run real jobs: CPU, memory and shm limits, restart policies, CPU placement near the
GPUs and InfiniBand, on the real engine, checked with the engine's inspect and from inside."""

from __future__ import annotations

import math
import os
import resource
import stat
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.fake_nvml import fake_gpus
from tests.support.polling import wait_for
from utopia_agent.claims.disks import allocatable_gb, disk_share
from utopia_agent.claims.resources import format_cpu_list

MIB = 1024 * 1024
NODE_CPUS = sorted(os.sched_getaffinity(0))
NODE_MEMORY_MB = psutil.virtual_memory().total // MIB


def inspect(docker_client, container_id: str) -> dict:
    return docker_client.api.inspect_container(container_id)


def run_in(docker_client, container_id: str, *command: str) -> str:
    exec_id = docker_client.api.exec_create(container_id, list(command))["Id"]
    return docker_client.api.exec_start(exec_id).decode()


def allowed_cpus(docker_client, container_id: str) -> str:
    """The CPUs the container's processes may run on, as the kernel says."""
    status = run_in(docker_client, container_id, "cat", "/proc/self/status")
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))


def created(response) -> str:
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def exited(docker_client, container_id: str, timeout: float = 60) -> dict:
    state = wait_for(lambda: (s := inspect(docker_client, container_id)["State"])["Status"] == "exited" and s, timeout)
    assert state, inspect(docker_client, container_id)["State"]
    return state


def reported(agent, container_id: str, check, timeout: float = 15) -> dict:
    """The container object as the agent's show and list give it, once `check` holds for both: the
    node view takes the outcome from the engine's events, a moment after the engine has it."""

    def both():
        shown = agent.get(f"/api/v1/containers/{container_id}").json()
        listed = next((c for c in agent.get("/api/v1/containers").json() if c["id"] == container_id), {})
        return shown if check(shown) and listed == shown else None

    found = wait_for(both, timeout, 0.3)
    assert found, agent.get(f"/api/v1/containers/{container_id}").json()
    return found


def local_cpus(first: int, last: int) -> str:
    """The stand-in's CPUs first..last as the agent may use them: clipped to the CPUs this machine has."""
    return format_cpu_list(set(range(first, last + 1)) & set(NODE_CPUS))


# --- shares and limits -------------------------------------------------------------------


def test_gpu_claim_gets_its_share_of_the_node(agent_factory, docker_client, test_image, claim, nvidia_path):
    agent = agent_factory(workers=1, UTOPIA_AGENT_RESERVED_CPUS="0.5", UTOPIA_AGENT_RESERVED_MEMORY_MB="1024")
    container_id = created(agent.create(claim(), test_image, gpu_count=2, command=["sleep", "300"]))

    cpus = math.floor((len(NODE_CPUS) - 0.5) * 2 / 8 * 100) / 100
    memory_mb = (NODE_MEMORY_MB - 1024) * 2 // 8
    host = inspect(docker_client, container_id)["HostConfig"]
    assert host["NanoCpus"] == round(cpus * 1e9)
    assert host["Memory"] == host["MemorySwap"] == memory_mb * MIB, "no swap: over the limit is an OOM kill"
    assert host["ShmSize"] == memory_mb // 2 * MIB and host["IpcMode"] == "private"
    resources = agent.get(f"/api/v1/containers/{container_id}").json()["resources"]
    root = os.statvfs(docker_client.info()["DockerRootDir"])
    disk_gb = disk_share(allocatable_gb(root.f_blocks * root.f_frsize, None), 2, 8)
    assert resources == {"cpus": cpus, "memory_mb": memory_mb, "shm_size_mb": memory_mb // 2, "cpuset": local_cpus(0, 31), "disk_gb": disk_gb}


def test_claim_without_gpus_or_limits_gets_none_but_a_big_shm(agent, docker_client, test_image, claim):
    container_id = created(agent.create(claim(), test_image, command=["sleep", "300"]))
    host = inspect(docker_client, container_id)["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["CpusetCpus"]) == (0, 0, "")
    assert host["ShmSize"] == 8192 * MIB, "UTOPIA_AGENT_DEFAULT_SHM_MB, never Docker's 64 MiB"
    df = run_in(docker_client, container_id, "busybox", "df", "-m", "/dev/shm").splitlines()[-1].split()
    assert int(df[1]) == 8192


def test_explicit_limits_are_applied_as_asked(agent, docker_client, test_image, claim, nvidia_path):
    container_id = created(
        agent.create(claim(), test_image, gpu_count=1, cpus=0.3, memory_mb=300, shm_size_mb=100, restart_policy="always", command=["sleep", "300"])
    )
    host = inspect(docker_client, container_id)["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["ShmSize"]) == (300_000_000, 300 * MIB, 100 * MIB)
    assert host["RestartPolicy"]["Name"] == "always"
    resources = agent.get(f"/api/v1/containers/{container_id}").json()["resources"]
    assert (resources["cpus"], resources["memory_mb"], resources["shm_size_mb"]) == (0.3, 300, 100)


def test_claim_writes_a_gibibyte_to_dev_shm(agent, docker_client, test_image, claim, nvidia_path):
    """A GPU claim's shm is half its memory share: on this node room for a DataLoader's 1 GiB."""
    assert NODE_MEMORY_MB > 8 * 1024, "the share of one GPU must leave room for 1 GiB of shm"
    script = "busybox dd if=/dev/zero of=/dev/shm/blob bs=1M count=1024 && busybox ls -l /dev/shm/blob && echo written; sleep 300"
    container_id = created(agent.create(claim(), test_image, gpu_count=1, command=["sh", "-c", script]))
    logs = wait_for(lambda: "written" in (text := agent.get(f"/api/v1/containers/{container_id}/logs").text) and text, 120, 0.5)
    assert logs, agent.get(f"/api/v1/containers/{container_id}/logs").text
    assert str(1024 * MIB) in logs
    shm_mb = agent.get(f"/api/v1/containers/{container_id}").json()["resources"]["shm_size_mb"]
    assert shm_mb >= 1024


def test_going_over_the_memory_limit_is_an_oom_kill(agent, docker_client, test_image, claim):
    allocate = "x=$(yes | head -c 200000000); echo survived"
    container_id = created(agent.create(claim(), test_image, memory_mb=64, restart_policy="no", command=["sh", "-c", allocate]))
    state = exited(docker_client, container_id)
    assert state["OOMKilled"] is True and state["ExitCode"] == 137, state
    shown = reported(agent, container_id, lambda c: c["finished"] > 0)
    assert (shown["oom_killed"], shown["exit_code"], shown["status"]) == (True, 137, "exited")
    assert "survived" not in agent.get(f"/api/v1/containers/{container_id}/logs").text


def test_one_shot_job_keeps_its_exit_code(agent_factory, docker_client, test_image, claim):
    agent = agent_factory(workers=1, UTOPIA_AGENT_RESTART_POLICY="always")
    container_id = created(agent.create(claim(), test_image, restart_policy="no", command=["sh", "-c", "exit 7"]))
    state = exited(docker_client, container_id)
    assert state["ExitCode"] == 7 and not state["FinishedAt"].startswith("0001")
    attrs = inspect(docker_client, container_id)
    assert attrs["RestartCount"] == 0 and attrs["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    shown = reported(agent, container_id, lambda c: c["finished"] > 0)
    assert (shown["exit_code"], shown["oom_killed"], shown["restart_count"], shown["error"]) == (7, False, 0, "")
    assert shown["finished"] >= shown["started"] > 0
    default = created(agent.create(claim("default"), test_image, command=["sleep", "300"]))
    assert inspect(docker_client, default)["HostConfig"]["RestartPolicy"]["Name"] == "always", "the node's policy when none is asked"


def test_on_failure_restarts_and_the_count_grows(agent, docker_client, test_image, claim):
    container_id = created(agent.create(claim(), test_image, restart_policy="on-failure", command=["sh", "-c", "echo attempt; exit 3"]))
    # A run that starts again reads exit code 0 until it ends (the engine resets it on start): wait for an end.
    def between_runs():
        attrs = inspect(docker_client, container_id)
        return attrs["RestartCount"] >= 2 and attrs["State"]["ExitCode"] == 3

    assert wait_for(between_runs, 60, 0.1), inspect(docker_client, container_id)["State"]
    shown = reported(agent, container_id, lambda c: c["restart_count"] >= 2 and c["exit_code"] == 3, timeout=30)
    assert shown["finished"] > 0
    assert agent.get(f"/api/v1/containers/{container_id}/logs").text.count("attempt") >= 2


def test_a_request_beyond_the_node_is_409_naming_what_is_free(agent, docker_client, test_image, claim):
    capacity = len(NODE_CPUS) - 1  # the agent keeps 1 CPU and 2048 MB by default
    too_many = agent.create(claim("cpus"), test_image, cpus=capacity + 1, command=["sleep", "300"])
    assert too_many.status_code == 409, too_many.text
    body = too_many.json()
    assert body["error"] == "not_enough_resources" and body["free_cpus"] == capacity and "free" in body["message"]
    too_much = agent.create(claim("memory"), test_image, memory_mb=NODE_MEMORY_MB, command=["sleep", "300"])
    assert too_much.status_code == 409 and too_much.json()["free_memory_mb"] == NODE_MEMORY_MB - 2048
    assert docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim('cpus')}"}) == []

    created(agent.create(claim("a"), test_image, cpus=capacity * 0.75, memory_mb=1024, command=["sleep", "300"]))
    second = agent.create(claim("b"), test_image, cpus=capacity * 0.5, command=["sleep", "300"])
    assert second.status_code == 409, "what other claims hold is not free"
    assert second.json()["free_cpus"] == round(capacity * 0.25, 2)
    assert second.json()["free_memory_mb"] == NODE_MEMORY_MB - 2048 - 1024


BAD_LIMITS = [
    ("cpus", 0), ("cpus", -1), ("cpus", "2"), ("cpus", True), ("cpus", 5000), ("cpus", None),
    ("memory_mb", 1.5), ("memory_mb", 8), ("memory_mb", "64"), ("shm_size_mb", 0), ("shm_size_mb", 2.5),
    ("restart_policy", "sometimes"), ("restart_policy", {"Name": "always"}), ("restart_policy", ""),
]


@pytest.mark.parametrize("field,value", BAD_LIMITS)
def test_bad_limits_are_400_naming_the_field(agent, docker_client, test_image, claim, field, value):
    response = agent.create(claim(), test_image, command=["true"], **{field: value})
    assert response.status_code == 400, response.text
    assert field in response.json()["errors"]
    assert docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim()}"}) == []


# --- CPU placement -----------------------------------------------------------------------


def test_cpuset_follows_the_gpus_cpu_affinity(agent_factory, docker_client, test_image, claim, nvidia_path):
    """The stand-in puts GPUs 0-3 next to CPU 0 and GPUs 4-7 next to CPU 1 (the two this machine has)."""
    assert len(NODE_CPUS) >= 2
    first, second = NODE_CPUS[:2]
    agent = agent_factory(workers=1, gpus=fake_gpus(8), numa_cpus=f"{first};{second}")
    low = created(agent.create(claim("low"), test_image, gpu_count=4, command=["sleep", "300"]))
    high = created(agent.create(claim("high"), test_image, gpu_count=4, command=["sleep", "300"]))

    assert agent.get(f"/api/v1/containers/{low}").json()["gpu_ids"] == [0, 1, 2, 3]
    for container_id, cpu in ((low, first), (high, second)):
        assert inspect(docker_client, container_id)["HostConfig"]["CpusetCpus"] == str(cpu)
        assert allowed_cpus(docker_client, container_id) == str(cpu)
        assert agent.get(f"/api/v1/containers/{container_id}").json()["resources"]["cpuset"] == str(cpu)
    assert inspect(docker_client, low)["HostConfig"]["CpusetMems"] == "0", "memory node 0 is local to GPUs 0-3"
    assert inspect(docker_client, high)["HostConfig"]["CpusetMems"] == "", "node 1 is not online here: left out"


def test_affinity_to_cpus_the_node_lacks_is_clipped(agent_factory, docker_client, test_image, claim, nvidia_path):
    """The stand-in's default is two sockets of 32 CPUs; this machine has fewer, and only those are given."""
    agent = agent_factory(workers=1, gpus=fake_gpus(8))
    low = created(agent.create(claim("low"), test_image, gpu_count=4, command=["sleep", "300"]))
    high = created(agent.create(claim("high"), test_image, gpu_count=4, command=["sleep", "300"]))
    assert inspect(docker_client, low)["HostConfig"]["CpusetCpus"] == local_cpus(0, 31)
    expected_high = local_cpus(32, 63)
    assert inspect(docker_client, high)["HostConfig"]["CpusetCpus"] == expected_high, "no CPU of socket 1 here: no pinning"
    assert agent.get(f"/api/v1/containers/{high}").json()["resources"]["cpuset"] == (expected_high or None)


def test_cpu_pinning_none_leaves_placement_to_the_kernel(agent_factory, docker_client, test_image, claim, nvidia_path):
    agent = agent_factory(workers=1, UTOPIA_AGENT_CPU_PINNING="none")
    container_id = created(agent.create(claim(), test_image, gpu_count=1, command=["sleep", "300"]))
    assert inspect(docker_client, container_id)["HostConfig"]["CpusetCpus"] == ""


def test_exclusive_pinning_never_gives_a_core_twice(agent_factory, docker_client, test_image, claim, nvidia_path):
    """16 creates at once on 4 workers, for 2 CPUs: one near GPUs 0-3, one near GPUs 4-7."""
    first, second = NODE_CPUS[:2]
    agent = agent_factory(
        workers=4, gpus=fake_gpus(8), numa_cpus=f"{first};{second}",
        UTOPIA_AGENT_CPU_PINNING="exclusive", UTOPIA_AGENT_RESERVED_CPUS="0",
    )
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: agent.create(claim(str(i)), test_image, gpu_count=1, command=["sleep", "300"]), range(16)))
    statuses = sorted(r.status_code for r in responses)
    won = [r.json()["container_id"] for r in responses if r.status_code == 201]
    assert len(won) == min(2, len(NODE_CPUS)), statuses
    assert {r.json()["error"] for r in responses if r.status_code != 201} == {"not_enough_resources"}, [r.text for r in responses]

    cpusets = [inspect(docker_client, c)["HostConfig"]["CpusetCpus"] for c in won]
    assert sorted(cpusets) == sorted([str(first), str(second)]), "whole cores, each to one claim"
    for container_id, cpuset in zip(won, cpusets, strict=True):
        obj = agent.get(f"/api/v1/containers/{container_id}").json()
        assert obj["labels"]["utopia.cpu_pinning"] == "exclusive"
        assert obj["resources"]["cpus"] == 1.0 and obj["resources"]["cpuset"] == cpuset
        assert (obj["gpu_ids"][0] < 4) == (cpuset == str(first)), "the core is local to the claim's GPU"
        assert allowed_cpus(docker_client, container_id) == cpuset

    agent.stop()
    agent.start()
    refused = agent.create(claim("after-restart"), test_image, gpu_count=1, command=["sleep", "300"])
    assert refused.status_code == 409, "the labels keep the cores held across an agent restart"
    assert refused.json()["free_cpus"] == 0


# --- InfiniBand --------------------------------------------------------------------------


def test_infiniband_devices_come_with_ipc_lock_and_unlimited_memlock(agent_factory, docker_client, test_image, claim, tmp_path):
    devices = tmp_path / "infiniband"
    devices.mkdir()
    null = os.stat("/dev/null").st_rdev
    for name in ("uverbs0", "rdma_cm"):
        os.mknod(devices / name, 0o666 | stat.S_IFCHR, null)
    (devices / "not-a-device").write_text("")
    agent = agent_factory(workers=1, UTOPIA_AGENT_INFINIBAND_DIR=str(devices))
    container_id = created(agent.create(claim(), test_image, command=["sleep", "300"]))

    host = inspect(docker_client, container_id)["HostConfig"]
    passed = {(d["PathOnHost"], d["PathInContainer"]) for d in host["Devices"]}
    assert passed == {(str(devices / n), f"/dev/infiniband/{n}") for n in ("uverbs0", "rdma_cm")}
    assert host["CapAdd"] == ["IPC_LOCK"]
    assert run_in(docker_client, container_id, "sh", "-c", "ulimit -l").strip() == memlock_this_node_allows()
    assert "uverbs0" in run_in(docker_client, container_id, "busybox", "ls", "/dev/infiniband")


def memlock_this_node_allows() -> str:
    """`ulimit -l` as a container can have it here: unlimited where root may raise limits
    (CAP_SYS_RESOURCE, as on a GPU node); in a sandbox without it, the hard limit in KiB."""
    status = open("/proc/self/status").read()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if effective >> 24 & 1 or hard == resource.RLIM_INFINITY:
        return "unlimited"
    return str(hard // 1024)


def test_a_node_without_infiniband_passes_nothing(agent, docker_client, test_image, claim):
    assert not os.path.exists("/dev/infiniband"), "this test needs a node without InfiniBand"
    container_id = created(agent.create(claim(), test_image, command=["sleep", "300"]))
    host = inspect(docker_client, container_id)["HostConfig"]
    assert not host["Devices"] and not host["CapAdd"] and not host["Ulimits"]
