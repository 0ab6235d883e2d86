"""Node policy end to end: what a token holder may ask of the node, and nothing more.

Every refusal is checked three ways: the status, a message and `errors` that name the field,
and that the engine holds no container for the claim afterwards (by label or by name).
"""

from __future__ import annotations

import os
import uuid

import pytest

from tests.conftest import RUN_ID
from tests.support.engine import free_host_port, make_image_with, remove_images
from utopia_agent.allocation.policy import RESERVED_ENV_NAMES
from utopia_agent.schemas import MAX_LIST_ITEMS, MAX_STRING

SECRET_ENV_VALUE = "s3cret-env-value-7f1e9a"


def made_for(docker_client, claim_id: str) -> list[str]:
    """Every container the agent could have made for `claim_id`: its label, or its name.

    One list call and no inspect per container, since other people's containers on a shared
    engine may vanish in between.
    """
    return [
        row["Names"][0].lstrip("/") for row in docker_client.api.containers(all=True)
        if (row.get("Labels") or {}).get("utopia.claim_id") == claim_id or f"/utopia-{claim_id}" in row["Names"]
    ]


def assert_refused(response, status: int, field: str, docker_client, claim_id: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["message"]
    assert field in body["errors"], body
    assert made_for(docker_client, claim_id) == []


# --- volumes -------------------------------------------------------------------------


def host_dir(agent, name: str):
    """A fresh directory inside the agent's volume root (unique: parametrized tests share claim names)."""
    path = agent.state_dir / "volumes" / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def test_host_path_outside_the_volume_roots_is_403(agent, docker_client, test_image, claim, tmp_path):
    response = agent.create(claim(), test_image, command=["true"], volumes={str(tmp_path): "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim())
    assert "volume roots" in response.json()["message"]


@pytest.mark.parametrize(
    "host",
    ["/", "/proc", "/proc/self/root", "/proc/1/root/etc", "/sys", "/dev", "/dev/shm", "/etc", "/etc/shadow", "//etc",
     "/boot", "/root", "/usr", "/var/run/docker.sock", "/run/docker.sock", "/var/lib/docker", "/var"],
)
def test_system_paths_are_never_mountable(agent, docker_client, test_image, claim, host):
    response = agent.create(claim(), test_image, command=["true"], volumes={host: "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim())


def test_dotdot_cannot_climb_out_of_a_volume_root(agent, docker_client, test_image, claim):
    escape = f"{agent.state_dir}/volumes/../.."
    response = agent.create(claim(), test_image, command=["true"], volumes={escape: "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim())


@pytest.mark.parametrize("target", ["outside", "/etc", "state", "inside"])
def test_a_symlink_below_the_root_is_403_wherever_it_points(agent, docker_client, test_image, claim, tmp_path, target):
    destination = {"outside": str(tmp_path), "/etc": "/etc", "state": str(agent.state_dir), "inside": str(host_dir(agent, claim("real")))}[target]
    link = agent.state_dir / "volumes" / f"link-{claim()}"
    link.symlink_to(destination)
    try:
        for host in (str(link), f"{link}/sub"):
            response = agent.create(claim(), test_image, command=["true"], volumes={host: "/data"})
            assert_refused(response, 403, "volumes", docker_client, claim())
            assert "symlink" in response.json()["message"]
    finally:
        link.unlink()


@pytest.mark.parametrize("where", ["state dir", "pinned mounts", "volume root"])
def test_the_agents_state_and_the_volume_root_itself_are_not_mountable(agent, docker_client, test_image, claim, where):
    host = {"state dir": agent.state_dir, "pinned mounts": agent.state_dir / "mounts", "volume root": agent.state_dir / "volumes"}[where]
    response = agent.create(claim(), test_image, command=["true"], volumes={str(host): "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim())


def test_a_missing_host_path_is_403_and_never_created(agent, docker_client, test_image, claim):
    missing = agent.state_dir / "volumes" / claim("missing") / "deeper"
    response = agent.create(claim(), test_image, command=["true"], volumes={str(missing): "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim())
    assert "does not exist" in response.json()["message"]
    assert not missing.parent.exists()


def test_nested_volumes_of_one_request_are_403(agent, docker_client, test_image, claim):
    """The attack: with `x` at /mnt and `x/sub` at /data, the tenant swaps `sub` for a symlink to `/`."""
    outer = host_dir(agent, claim("x"))
    (outer / "sub").mkdir()
    for volumes in ({str(outer): "/mnt", str(outer / "sub"): "/data"}, {str(outer / "sub"): "/data", str(outer): "/mnt"}):
        response = agent.create(claim(), test_image, command=["true"], volumes=volumes)
        assert_refused(response, 403, "volumes", docker_client, claim())
        assert "overlaps" in response.json()["message"]


@pytest.mark.parametrize("relation", ["inside", "containing", "same"])
def test_a_volume_overlapping_another_claims_is_403(agent, docker_client, test_image, claim, relation):
    mounted = host_dir(agent, claim("shared")) / "held"
    mounted.mkdir()
    (mounted / "inner").mkdir()
    first = agent.create(claim("a"), test_image, command=["sleep", "300"], volumes={str(mounted): "/data"})
    assert first.status_code == 201, first.text
    host = {"inside": mounted / "inner", "containing": mounted.parent, "same": mounted}[relation]
    response = agent.create(claim("b"), test_image, command=["sleep", "300"], volumes={str(host): "/data"})
    assert_refused(response, 403, "volumes", docker_client, claim("b"))
    assert first.json()["container_id"][:12] in response.json()["message"]
    assert agent.delete(f"/api/v1/containers/{first.json()['container_id']}").status_code == 204
    again = agent.create(claim("b"), test_image, command=["true"], volumes={str(host): "/data"})
    assert again.status_code == 201, "a deleted claim's volumes are free again"


@pytest.mark.parametrize("inside", ["/proc", "/proc/sys", "/sys", "/sys/fs/cgroup", "/dev", "/dev/shm", "/", "//proc", "/x/../dev"])
def test_container_paths_may_not_shadow_system_paths(agent, docker_client, test_image, claim, inside):
    response = agent.create(claim(), test_image, command=["true"], volumes={str(host_dir(agent, claim())): inside})
    assert_refused(response, 403, "volumes", docker_client, claim())


@pytest.mark.parametrize("inside", ["data", "./data", "", "~/data", "/data\x00"])
def test_container_paths_must_be_absolute(agent, docker_client, test_image, claim, inside):
    response = agent.create(claim(), test_image, command=["true"], volumes={str(host_dir(agent, claim())): inside})
    assert_refused(response, 400, "volumes", docker_client, claim())


def test_relative_host_path_is_400(agent, docker_client, test_image, claim):
    response = agent.create(claim(), test_image, command=["true"], volumes={"volumes": "/data"})
    assert_refused(response, 400, "volumes", docker_client, claim())


def test_same_container_path_twice_is_403(agent, docker_client, test_image, claim):
    first, second = agent.state_dir / "volumes" / f"{claim()}-1", agent.state_dir / "volumes" / f"{claim()}-2"
    first.mkdir()
    second.mkdir()
    response = agent.create(claim(), test_image, command=["true"], volumes={str(first): "/data", str(second): "/data/"})
    assert_refused(response, 403, "volumes", docker_client, claim())
    assert "twice" in response.json()["message"]


def test_same_host_path_twice_is_403(agent, docker_client, test_image, claim):
    path = host_dir(agent, claim())
    response = agent.create(claim(), test_image, command=["true"], volumes={str(path): "/a", f"{path}/": "/b"})
    assert_refused(response, 403, "volumes", docker_client, claim())


def test_too_many_volumes_is_400(agent, docker_client, test_image, claim):
    volumes = {f"{agent.state_dir}/volumes/v{i}": f"/v{i}" for i in range(33)}
    response = agent.create(claim(), test_image, command=["true"], volumes=volumes)
    assert_refused(response, 400, "volumes", docker_client, claim())


# --- ports ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged_agent(module_agents):
    """An agent whose host ports are 20000-30000 (the shared test agent allows nearly all)."""
    return module_agents(workers=1, UTOPIA_AGENT_HOST_PORT_RANGE="20000-30000")


@pytest.mark.parametrize("host_port", [80, 19999, 30001, 65535])
def test_host_port_outside_the_range_is_403(ranged_agent, docker_client, test_image, claim, host_port):
    response = ranged_agent.create(claim(), test_image, command=["true"], port_mappings=[{"host_port": host_port, "container_port": 80}])
    assert_refused(response, 403, "port_mappings", docker_client, claim())
    assert "20000-30000" in response.json()["message"]


@pytest.mark.parametrize(
    "mappings",
    [
        [{"host_port": 31001, "container_port": 80}, {"host_port": 31001, "container_port": 81}],
        [{"host_port": 31001, "container_port": 80, "protocol": "udp"}, {"host_port": 31001, "container_port": 81, "protocol": "udp"}],
        [{"host_port": 31001, "container_port": 80, "protocol": "sctp"}],
        [{"host_port": 31001, "container_port": 80, "protocol": "TCP"}],
        [{"host_port": 31001, "container_port": 0}],
        [{"host_port": 31001, "container_port": 65536}],
        [{"host_port": 0, "container_port": 80}],
        [{"host_port": 31001, "container_port": "80"}],
        [{"host_port": 31001, "container_port": 80, "host_ip": "0.0.0.0"}],
        [{"host_port": 31000 + i, "container_port": 80} for i in range(65)],
    ],
    ids=["duplicate", "duplicate-udp", "sctp", "uppercase-protocol", "container-port-0", "container-port-65536",
         "host-port-0", "string-port", "unknown-field", "too-many"],
)
def test_bad_port_mappings_are_400(agent, docker_client, test_image, claim, mappings):
    response = agent.create(claim(), test_image, command=["true"], port_mappings=mappings)
    assert_refused(response, 400, "port_mappings", docker_client, claim())


# --- env vars ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["NOEQUALS", "=value", "1ABC=x", "A-B=x", "A B=x", "A.B=x", "A\n=x", "Ä=x", "A=x\x00y"])
def test_malformed_env_vars_are_400(agent, docker_client, test_image, claim, entry):
    response = agent.create(claim(), test_image, command=["true"], env_vars=["OK=1", entry])
    assert_refused(response, 400, "env_vars", docker_client, claim())


@pytest.mark.parametrize(
    "name",
    sorted(RESERVED_ENV_NAMES | {"CUDA_VERSION", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
                                 "NVIDIA_REQUIRE_CUDA", "NVIDIA_IMEX_CHANNELS", "NVIDIA_GDS", "NVIDIA_ANY_FUTURE_NAME", "NVIDIA_"}),
)
def test_gpu_selecting_env_vars_are_reserved(agent, docker_client, test_image, claim, name):
    response = agent.create(claim(), test_image, command=["true"], env_vars=[f"{name}=all"])
    assert_refused(response, 403, "env_vars", docker_client, claim())
    assert name in response.json()["message"]


# --- images --------------------------------------------------------------------------


FORGED_PORT = free_host_port()


@pytest.fixture
def forged_image(docker_client, test_image):
    """An image whose labels claim every GPU and a port for any container made from it."""
    tag = make_image_with(
        docker_client, f"utopia-test/forged-labels:{RUN_ID}",
        "LABEL utopia.gpu_ids=0,1,2,3,4,5,6,7", f"LABEL utopia.ports={FORGED_PORT}:80/tcp",
    )
    yield tag
    remove_images(docker_client, [tag])


@pytest.mark.usefixtures("nvidia_path")
def test_an_image_with_the_agents_labels_is_403_and_holds_nothing(agent, docker_client, test_image, forged_image, claim):
    response = agent.create(claim(), forged_image, command=["sleep", "300"])
    assert_refused(response, 403, "image", docker_client, claim())
    assert response.json()["error"] == "forbidden_by_policy"
    assert "utopia.gpu_ids" in response.json()["message"] and "utopia.ports" in response.json()["message"]
    after = agent.create(claim("gpus"), test_image, gpu_count=2, command=["sleep", "300"], port_mappings=[{"host_port": FORGED_PORT, "container_port": 80}])
    assert after.status_code == 201, after.text
    assert len(agent.get(f"/api/v1/containers/{after.json()['container_id']}").json()["gpu_ids"]) == 2


# --- claim id, image, command, working dir, unknown fields ---------------------------


@pytest.mark.parametrize(
    "make_claim",
    [lambda c: "", lambda c: "-" + c, lambda c: "." + c, lambda c: c + "/x", lambda c: c + " x", lambda c: c + ":x",
     lambda c: c + "\n", lambda c: c + "ä", lambda c: (c + "x" * 64)[:64], lambda c: 7],
    ids=["empty", "leading-dash", "leading-dot", "slash", "space", "colon", "newline", "non-ascii", "64-chars", "number"],
)
def test_bad_claim_ids_are_400(agent, docker_client, test_image, claim, make_claim):
    claim_id = make_claim(claim())
    response = agent.create(claim_id, test_image, command=["true"])
    assert_refused(response, 400, "claim_id", docker_client, str(claim_id))


def test_a_63_character_claim_id_is_accepted(agent, docker_client, test_image, claim):
    claim_id = (claim() + "x" * 63)[:63]
    response = agent.create(claim_id, test_image, command=["sleep", "60"])
    assert response.status_code == 201, response.text
    assert made_for(docker_client, claim_id) == [f"utopia-{claim_id}"]


@pytest.mark.parametrize(
    "image",
    ["", "UPPER/case", "busybox latest", "-busybox", "busybox:", "busybox:-x", "busybox@sha256:abc", "http://host/busybox",
     "busybox\n", "busybox:latest\n", "a" * 513, "busybox:" + "t" * 129],
)
def test_bad_image_references_are_400(agent, docker_client, claim, image):
    response = agent.create(claim(), image, command=["true"])
    assert_refused(response, 400, "image", docker_client, claim())


@pytest.mark.parametrize(
    "command",
    [["x"] * (MAX_LIST_ITEMS + 1), ["sh", "-c", "y" * (MAX_STRING + 1)], ["sh\x00"], [1, 2], "sleep 1"],
    ids=["too-many-items", "item-too-long", "nul", "not-strings", "not-a-list"],
)
def test_bad_commands_are_400(agent, docker_client, test_image, claim, command):
    response = agent.create(claim(), test_image, command=command)
    assert_refused(response, 400, "command", docker_client, claim())


@pytest.mark.parametrize("working_dir", ["srv", "./srv", "/" + "w" * MAX_STRING, "/srv\x00", 7])
def test_bad_working_dirs_are_400(agent, docker_client, test_image, claim, working_dir):
    response = agent.create(claim(), test_image, command=["true"], working_dir=working_dir)
    assert_refused(response, 400, "working_dir", docker_client, claim())


@pytest.mark.parametrize(
    "field,value",
    [("privileged", True), ("network_mode", "host"), ("pid_mode", "host"), ("ipc_mode", "host"), ("cap_add", ["SYS_ADMIN"]),
     ("devices", ["/dev/mem"]), ("security_opt", ["seccomp=unconfined"]), ("runtime", "runc"), ("user", "0"),
     ("ipc", "host"), ("labels", {"utopia.managed": "false"}), ("Env", ["A=1"])],
)
def test_unknown_fields_are_400(agent, docker_client, test_image, claim, field, value):
    response = agent.create(claim(), test_image, command=["true"], **{field: value})
    assert_refused(response, 400, field, docker_client, claim())


# --- path ids and filters ------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["0123456789ab%0A", "0123456789AB", "0123456789a", "%2E%2E"])
def test_ids_that_are_not_12_to_64_hex_digits_are_404(agent, bad_id):
    for method in ("GET", "DELETE"):
        response = agent.request(method, f"/api/v1/containers/{bad_id}")
        assert response.status_code == 404, (method, response.text)
        assert response.json()["message"]


@pytest.mark.parametrize("claim_filter", ["abc\n", "a/b", "", "-x"])
def test_bad_claim_filters_are_400(agent, claim_filter):
    response = agent.get("/api/v1/containers", params={"claim_id": claim_filter})
    assert response.status_code == 400, response.text
    assert "claim_id" in response.json()["errors"]


# --- what a container is allowed ------------------------------------------------------


@pytest.mark.parametrize(
    "env,restart,pids_limit,max_size,max_file",
    [
        (None, "no", 4096, "50m", "3"),
        ({"UTOPIA_AGENT_RESTART_POLICY": ""}, "unless-stopped", 4096, "50m", "3"),
        ({"UTOPIA_AGENT_RESTART_POLICY": "on-failure", "UTOPIA_AGENT_PIDS_LIMIT": "512",
          "UTOPIA_AGENT_LOG_MAX_SIZE": "10m", "UTOPIA_AGENT_LOG_MAX_FILES": "5"}, "on-failure", 512, "10m", "5"),
    ],
    ids=["test-agent", "defaults", "configured"],
)
def test_containers_run_unprivileged_with_limits(agent, agent_factory, docker_client, test_image, claim, env, restart, pids_limit, max_size, max_file):
    target = agent if env is None else agent_factory(workers=1, **env)
    response = target.create(claim(), test_image, command=["sleep", "60"])
    assert response.status_code == 201, response.text
    host = docker_client.api.inspect_container(response.json()["container_id"])["HostConfig"]
    assert host["Privileged"] is False
    assert host["NetworkMode"] not in ("host",) and not host["NetworkMode"].startswith("container:")
    assert host["PidMode"] in ("", "private")
    assert host["IpcMode"] not in ("host",) and not host["IpcMode"].startswith("container:")
    assert "no-new-privileges" in (host["SecurityOpt"] or [])
    assert not host["CapAdd"] and not host["Devices"]
    assert host["PidsLimit"] == pids_limit
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": max_size, "max-file": max_file}}
    assert (host["RestartPolicy"]["Name"] or "no") == restart


# --- secrets in the log ----------------------------------------------------------------


def test_the_log_carries_neither_the_token_nor_env_values(agent_factory, docker_client, test_image, claim):
    quiet = agent_factory(workers=1, UTOPIA_AGENT_LOG_FORMAT="text")
    loud = agent_factory(workers=1)
    wrong_token = "wrong-token-" + SECRET_ENV_VALUE[::-1]
    for target in (quiet, loud):
        env_vars = [f"API_KEY={SECRET_ENV_VALUE}", f"PASSWORD={SECRET_ENV_VALUE}-2"]
        suffix = os.path.basename(str(target.state_dir))
        created = target.create(claim(suffix), test_image, command=["sleep", "60"], env_vars=env_vars)
        assert created.status_code == 201, created.text
        failed = target.create(claim(suffix + "-x"), test_image, command=["/no/such/binary"], env_vars=env_vars)
        assert failed.status_code == 400, failed.text
        reserved = target.create(claim(suffix + "-y"), test_image, env_vars=[f"CUDA_VISIBLE_DEVICES={SECRET_ENV_VALUE}"])
        assert reserved.status_code == 403
        for header in (f"Bearer {wrong_token}", f"Basic {wrong_token}", wrong_token):
            assert target.get("/api/v1/containers", auth=False, headers={"Authorization": header}).status_code == 401
        assert target.get("/api/v1/containers").status_code == 200
        log = target.log()
        assert "container created" in log and "/api/v1/containers" in log
        for secret in (target.token, SECRET_ENV_VALUE, wrong_token):
            assert secret not in log
