"""Validation, policy, auth and error mapping through Flask's test client and an in-memory engine.

No engine, no gunicorn: these run in seconds under `pytest -m "not docker"`. Every refusal is
checked for its status, its `error` code, the field it names, and that the engine holds no
container afterwards. What only a real engine proves stays in the `docker` suite.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from flask import request

from tests.support.memory_engine import MemoryEngine
from utopia_agent.api.openapi import security_of
from utopia_agent.app import create_app
from utopia_agent.config import load_config
from utopia_agent.claims.records import GPU_IDS_LABEL
from utopia_agent.errors import EngineError, EngineUnavailable
from utopia_agent.gpus.inventory import GpuInventory
from utopia_agent.allocation.policy import RESERVED_ENV_NAMES
from utopia_agent.schemas import MAX_LIST_ITEMS, MAX_STRING

TOKEN = "fast-test-token"
IMAGE = "busybox:memory"
CLAIM = "fast-claim"
PORT_RANGE = "20000-30000"
CONTAINERS = "/api/v1/containers"


def make_app(tmp_path, memory: MemoryEngine, gpus: GpuInventory | None = None, **env: str):
    state_dir = tmp_path / "state"
    (state_dir / "volumes").mkdir(parents=True)
    config = load_config(
        {
            "UTOPIA_AGENT_TOKEN": TOKEN,
            "UTOPIA_AGENT_STATE_DIR": str(state_dir),
            "UTOPIA_AGENT_GPU_BACKEND": "fake",
            "UTOPIA_AGENT_HOST_PORT_RANGE": PORT_RANGE,
            "UTOPIA_AGENT_RESTART_POLICY": "no",
            # The memory engine has no networks, and these tests touch no firewall (test_isolation does).
            "UTOPIA_AGENT_NETWORK_ISOLATION": "off",
            **env,
        },
        ephemeral_ports_path=tmp_path / "no-ephemeral-ports",
    )
    app = create_app(config, gpus=gpus, docker=memory)
    app.extensions["undeclared"] = []

    @app.after_request
    def note_undeclared_status(response):
        """Every answer of a route must be one its declaration (and so /openapi.json) lists."""
        rule = request.url_rule
        if rule is not None:
            declared = app.view_functions[rule.endpoint].operation
            failures = declared.all_failures(bool(security_of(rule, declared)), request.method)
            if response.status_code not in {r.status for r in declared.responses} | {f.status for f in failures}:
                app.extensions["undeclared"].append((request.method, rule.rule, response.status_code))
        return response

    return app


@pytest.fixture
def memory() -> MemoryEngine:
    return MemoryEngine(images={IMAGE: {}})


@pytest.fixture
def app(tmp_path, memory):
    made = make_app(tmp_path, memory)
    yield made
    made.extensions["utopia"].close()
    assert made.extensions["undeclared"] == [], "statuses the routes answered without declaring them"


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def volumes_dir(app):
    return app.extensions["utopia"].config.state_dir / "volumes"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(client, claim_id=CLAIM, image=IMAGE, **fields):
    return client.post(CONTAINERS, json={"claim_id": claim_id, "image": image, **fields}, headers=auth())


def assert_refused(response, status: int, code: str, field: str | None, memory: MemoryEngine) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == code and body["message"]
    if field is not None:
        assert field in body["errors"], body
    assert memory.containers == {}
    return body


# --- bodies ------------------------------------------------------------------------


BAD_BODIES = [
    ({"image": "x"}, "claim_id"),
    ({"claim_id": "c"}, "image"),
    ({"claim_id": "c", "image": "x", "surprise": 1}, "surprise"),
    ({"claim_id": "c", "image": "x", "gpu_count": "2"}, "gpu_count"),
    ({"claim_id": "c", "image": "x", "gpu_count": 1.5}, "gpu_count"),
    ({"claim_id": "c", "image": "x", "gpu_count": True}, "gpu_count"),
    ({"claim_id": "c", "image": "x", "gpu_count": -1}, "gpu_count"),
    ({"claim_id": 7, "image": "x"}, "claim_id"),
    ({"claim_id": "c", "image": "x", "command": "sleep 1"}, "command"),
    ({"claim_id": "c", "image": "x", "env_vars": ["NOEQUALS"]}, "env_vars"),
    ({"claim_id": "c", "image": "x", "volumes": ["/a"]}, "volumes"),
    ({"claim_id": "c", "image": "x", "port_mappings": [{"host_port": 30001}]}, "port_mappings"),
    ({"claim_id": "c", "image": "x", "port_mappings": [{"host_port": 30001, "container_port": 80, "protocol": "sctp"}]}, "port_mappings"),
    ({"claim_id": "c", "image": "x", "working_dir": "relative"}, "working_dir"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
def test_invalid_bodies_are_400_with_per_field_messages(client, memory, body, field):
    response = client.post(CONTAINERS, json=body, headers=auth())
    assert_refused(response, 400, "invalid_request", field, memory)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b"{", b"null", b"[" * 3000 + b"]" * 3000])
def test_bodies_that_are_not_a_json_object_are_400(client, memory, raw):
    response = client.post(CONTAINERS, data=raw, headers={**auth(), "Content-Type": "application/json"})
    assert_refused(response, 400, "invalid_request", None, memory)


@pytest.mark.parametrize("path", [CONTAINERS, "/api/v1/gpus/GPU-fake-0000-0000-0000-000000000000/quarantine", "/api/v1/node/drain"])
def test_oversized_body_is_413_naming_the_limit(client, memory, path):
    """On every route that takes a body (and declares so, see the app fixture)."""
    response = client.post(path, json={"claim_id": CLAIM, "image": IMAGE, "reason": "y" * 70000}, headers=auth())
    body = assert_refused(response, 413, "body_too_large", None, memory)
    assert body["max_body_bytes"] == 65536
    assert "65536 bytes" in body["message"] and "UTOPIA_AGENT_MAX_BODY_BYTES" in body["message"]


@pytest.mark.parametrize(
    "field,value",
    [("privileged", True), ("network_mode", "host"), ("pid_mode", "host"), ("ipc_mode", "host"), ("cap_add", ["SYS_ADMIN"]),
     ("devices", ["/dev/mem"]), ("security_opt", ["seccomp=unconfined"]), ("runtime", "runc"), ("user", "0"),
     ("ipc", "host"), ("labels", {"utopia.managed": "false"}), ("Env", ["A=1"])],
)
def test_unknown_fields_are_400(client, memory, field, value):
    assert_refused(create(client, command=["true"], **{field: value}), 400, "invalid_request", field, memory)


@pytest.mark.parametrize(
    "claim_id",
    ["", "-" + CLAIM, "." + CLAIM, CLAIM + "/x", CLAIM + " x", CLAIM + ":x", CLAIM + "\n", CLAIM + "ä", "c" * 64, 7],
    ids=["empty", "leading-dash", "leading-dot", "slash", "space", "colon", "newline", "non-ascii", "64-chars", "number"],
)
def test_bad_claim_ids_are_400(client, memory, claim_id):
    assert_refused(create(client, claim_id, command=["true"]), 400, "invalid_request", "claim_id", memory)


def test_a_63_character_claim_id_is_accepted(client, memory):
    response = create(client, "c" * 63, command=["sleep", "60"])
    assert response.status_code == 201, response.get_data(as_text=True)
    [container] = memory.containers.values()
    assert container.name == "utopia-" + "c" * 63 and container.status == "running"


@pytest.mark.parametrize(
    "image",
    ["", "UPPER/case", "busybox latest", "-busybox", "busybox:", "busybox:-x", "busybox@sha256:abc", "http://host/busybox",
     "busybox\n", "busybox:latest\n", "a" * 513, "busybox:" + "t" * 129],
)
def test_bad_image_references_are_400(client, memory, image):
    assert_refused(create(client, image=image, command=["true"]), 400, "invalid_request", "image", memory)


@pytest.mark.parametrize(
    "registry_auth",
    [{"username": "u"}, {"password": "s3cret-pw"}, {"username": "", "password": "s3cret-pw"}, {"username": "u", "password": ""},
     {"username": "u", "password": "s3cret-pw", "email": "x"}, {"username": "u", "password": 7}, "u:s3cret-pw"],
    ids=["no-password", "no-username", "empty-username", "empty-password", "unknown-field", "not-a-string", "not-an-object"],
)
def test_bad_registry_auth_is_400_and_never_echoes_the_password(client, memory, registry_auth):
    body = assert_refused(create(client, command=["true"], registry_auth=registry_auth), 400, "invalid_request", "registry_auth", memory)
    assert "s3cret-pw" not in json.dumps(body)


@pytest.mark.parametrize(
    "command",
    [["x"] * (MAX_LIST_ITEMS + 1), ["sh", "-c", "y" * (MAX_STRING + 1)], ["sh\x00"], [1, 2], "sleep 1"],
    ids=["too-many-items", "item-too-long", "nul", "not-strings", "not-a-list"],
)
def test_bad_commands_are_400(client, memory, command):
    assert_refused(create(client, command=command), 400, "invalid_request", "command", memory)


@pytest.mark.parametrize("working_dir", ["srv", "./srv", "/" + "w" * MAX_STRING, "/srv/" + "w" * 256, "/srv\x00", 7])
def test_bad_working_dirs_are_400(client, memory, working_dir):
    assert_refused(create(client, command=["true"], working_dir=working_dir), 400, "invalid_request", "working_dir", memory)


# --- env vars ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["NOEQUALS", "=value", "1ABC=x", "A-B=x", "A B=x", "A.B=x", "A\n=x", "Ä=x", "A=x\x00y"])
def test_malformed_env_vars_are_400(client, memory, entry):
    assert_refused(create(client, command=["true"], env_vars=["OK=1", entry]), 400, "invalid_request", "env_vars", memory)


@pytest.mark.parametrize(
    "name",
    sorted(RESERVED_ENV_NAMES | {"CUDA_VERSION", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
                                 "NVIDIA_REQUIRE_CUDA", "NVIDIA_IMEX_CHANNELS", "NVIDIA_GDS", "NVIDIA_ANY_FUTURE_NAME", "NVIDIA_"}),
)
def test_gpu_selecting_env_vars_are_reserved(client, memory, name):
    body = assert_refused(create(client, command=["true"], env_vars=[f"{name}=all"]), 403, "forbidden_by_policy", "env_vars", memory)
    assert name in body["message"]


# --- ports -------------------------------------------------------------------------


@pytest.mark.parametrize("host_port", [80, 19999, 30001, 65535])
def test_host_port_outside_the_range_is_403(client, memory, host_port):
    response = create(client, command=["true"], port_mappings=[{"host_port": host_port, "container_port": 80}])
    body = assert_refused(response, 403, "forbidden_by_policy", "port_mappings", memory)
    assert PORT_RANGE in body["message"]


@pytest.mark.parametrize(
    "mappings",
    [
        [{"host_port": 21001, "container_port": 80}, {"host_port": 21001, "container_port": 81}],
        [{"host_port": 21001, "container_port": 80, "protocol": "udp"}, {"host_port": 21001, "container_port": 81, "protocol": "udp"}],
        [{"host_port": 21001, "container_port": 80, "protocol": "sctp"}],
        [{"host_port": 21001, "container_port": 80, "protocol": "TCP"}],
        [{"host_port": 21001, "container_port": 0}],
        [{"host_port": 21001, "container_port": 65536}],
        [{"host_port": 0, "container_port": 80}],
        [{"host_port": 21001, "container_port": "80"}],
        [{"host_port": 21001, "container_port": 80, "host_ip": "0.0.0.0"}],
        [{"host_port": 21000 + i, "container_port": 80} for i in range(65)],
    ],
    ids=["duplicate", "duplicate-udp", "sctp", "uppercase-protocol", "container-port-0", "container-port-65536",
         "host-port-0", "string-port", "unknown-field", "too-many"],
)
def test_bad_port_mappings_are_400(client, memory, mappings):
    assert_refused(create(client, command=["true"], port_mappings=mappings), 400, "invalid_request", "port_mappings", memory)


def test_host_port_held_by_another_claim_is_409(client, memory):
    mapping = [{"host_port": 21002, "container_port": 80}]
    assert create(client, "first", command=["sleep", "60"], port_mappings=mapping).status_code == 201
    [held] = memory.containers
    response = create(client, "second", command=["sleep", "60"], port_mappings=mapping)
    assert response.status_code == 409 and response.get_json()["error"] == "port_taken"
    assert list(memory.containers) == [held]


# --- volumes: policy refuses them before anything is pinned -------------------------


def test_host_path_outside_the_volume_roots_is_403(client, memory, tmp_path):
    body = assert_refused(create(client, command=["true"], volumes={str(tmp_path): "/data"}), 403, "forbidden_by_policy", "volumes", memory)
    assert "volume roots" in body["message"]


@pytest.mark.parametrize(
    "host",
    ["/", "/proc", "/proc/self/root", "/proc/1/root/etc", "/sys", "/dev", "/dev/shm", "/etc", "/etc/shadow", "//etc",
     "/boot", "/root", "/usr", "/var/run/docker.sock", "/run/docker.sock", "/var/lib/docker", "/var"],
)
def test_system_paths_are_never_mountable(client, memory, host):
    assert_refused(create(client, command=["true"], volumes={host: "/data"}), 403, "forbidden_by_policy", "volumes", memory)


def test_dotdot_cannot_climb_out_of_a_volume_root(client, memory, volumes_dir):
    response = create(client, command=["true"], volumes={f"{volumes_dir}/../..": "/data"})
    assert_refused(response, 403, "forbidden_by_policy", "volumes", memory)


@pytest.mark.parametrize("where", ["state dir", "pinned mounts", "volume root"])
def test_the_agents_state_and_the_volume_root_itself_are_not_mountable(client, memory, volumes_dir, where):
    host = {"state dir": volumes_dir.parent, "pinned mounts": volumes_dir.parent / "mounts", "volume root": volumes_dir}[where]
    assert_refused(create(client, command=["true"], volumes={str(host): "/data"}), 403, "forbidden_by_policy", "volumes", memory)


def test_a_missing_host_path_is_403_and_never_created(client, memory, volumes_dir):
    missing = volumes_dir / "missing" / "deeper"
    body = assert_refused(create(client, command=["true"], volumes={str(missing): "/data"}), 403, "forbidden_by_policy", "volumes", memory)
    assert "does not exist" in body["message"]
    assert not missing.parent.exists()


@pytest.mark.parametrize("target", ["outside", "/etc", "state", "inside"])
def test_a_symlink_below_the_root_is_403_wherever_it_points(client, memory, volumes_dir, tmp_path, target):
    (volumes_dir / "real").mkdir()
    destination = {"outside": tmp_path, "/etc": "/etc", "state": volumes_dir.parent, "inside": volumes_dir / "real"}[target]
    link = volumes_dir / "link"
    link.symlink_to(destination)
    for host in (str(link), f"{link}/sub"):
        body = assert_refused(create(client, command=["true"], volumes={host: "/data"}), 403, "forbidden_by_policy", "volumes", memory)
        assert "symlink" in body["message"]


def test_nested_volumes_of_one_request_are_403(client, memory, volumes_dir):
    outer = volumes_dir / "x"
    (outer / "sub").mkdir(parents=True)
    for volumes in ({str(outer): "/mnt", str(outer / "sub"): "/data"}, {str(outer / "sub"): "/data", str(outer): "/mnt"}):
        body = assert_refused(create(client, command=["true"], volumes=volumes), 403, "forbidden_by_policy", "volumes", memory)
        assert "overlaps" in body["message"]


@pytest.mark.parametrize("inside", ["/proc", "/proc/sys", "/sys", "/sys/fs/cgroup", "/dev", "/dev/shm", "/", "//proc", "/x/../dev"])
def test_container_paths_may_not_shadow_system_paths(client, memory, volumes_dir, inside):
    assert_refused(create(client, command=["true"], volumes={str(volumes_dir / "data"): inside}), 403, "forbidden_by_policy", "volumes", memory)


@pytest.mark.parametrize("inside", ["data", "./data", "", "~/data", "/data\x00", "/data/" + "d" * 256])
def test_container_paths_must_be_absolute_with_names_that_fit(client, memory, volumes_dir, inside):
    assert_refused(create(client, command=["true"], volumes={str(volumes_dir / "data"): inside}), 400, "invalid_request", "volumes", memory)


def test_relative_host_path_is_400(client, memory):
    assert_refused(create(client, command=["true"], volumes={"volumes": "/data"}), 400, "invalid_request", "volumes", memory)


def test_same_container_path_twice_is_403(client, memory, volumes_dir):
    (volumes_dir / "1").mkdir()
    (volumes_dir / "2").mkdir()
    response = create(client, command=["true"], volumes={str(volumes_dir / "1"): "/data", str(volumes_dir / "2"): "/data/"})
    assert "twice" in assert_refused(response, 403, "forbidden_by_policy", "volumes", memory)["message"]


def test_same_host_path_twice_is_403(client, memory, volumes_dir):
    (volumes_dir / "data").mkdir()
    response = create(client, command=["true"], volumes={str(volumes_dir / "data"): "/a", f"{volumes_dir}/data/": "/b"})
    assert_refused(response, 403, "forbidden_by_policy", "volumes", memory)


def test_too_many_volumes_is_400(client, memory, volumes_dir):
    volumes = {f"{volumes_dir}/v{i}": f"/v{i}" for i in range(33)}
    assert_refused(create(client, command=["true"], volumes=volumes), 400, "invalid_request", "volumes", memory)


# --- images ------------------------------------------------------------------------


def test_an_image_with_the_agents_labels_is_403_and_holds_nothing(client, memory):
    memory.images["forged:1"] = {GPU_IDS_LABEL: "0,1,2,3,4,5,6,7", "utopia.ports": "21003:80/tcp"}
    body = assert_refused(create(client, image="forged:1", command=["sleep", "60"]), 403, "forbidden_by_policy", "image", memory)
    assert "utopia.gpu_ids" in body["message"] and "utopia.ports" in body["message"]


def test_an_image_the_engine_cannot_pull_is_502(client, memory):
    body = assert_refused(create(client, image="never/pulled:1", command=["true"]), 502, "image_pull_failed", None, memory)
    assert body["image"] == "never/pulled:1"


# --- auth --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}", "Bearer wrong-token", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"],
    ids=["missing", "empty", "bare-scheme", "blank-token", "basic", "no-scheme", "other-scheme", "wrong", "longer", "shorter"],
)
@pytest.mark.parametrize("method,path", [("GET", CONTAINERS), ("POST", CONTAINERS), ("GET", f"{CONTAINERS}/{'a' * 64}"), ("DELETE",
    f"{CONTAINERS}/{'a' * 64}")])
def test_requests_without_the_token_are_401(client, memory, header, method, path):
    headers = {} if header is None else {"Authorization": header}
    response = client.open(path, method=method, headers=headers, json={"claim_id": CLAIM, "image": IMAGE} if method == "POST" else None)
    assert_refused(response, 401, "unauthorized", None, memory)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_token_opens_the_api(client):
    response = client.get(CONTAINERS, headers=auth())
    assert response.status_code == 200 and response.get_json() == []


# --- routes, methods, ids and queries ------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    ["nothex-nothex", "abc", "0123456789ab" * 6, "utopia-x", "..%2F..%2Fetc", "0123456789ab%0A", "0123456789AB", "0123456789a", "%2E%2E", "a" * 64],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_bad_or_unknown_ids_are_404(client, memory, bad_id, method):
    assert_refused(client.open(f"{CONTAINERS}/{bad_id}", method=method, headers=auth()), 404, "not_found", None, memory)


@pytest.mark.parametrize("method,path,allowed", [("PUT", CONTAINERS, {"GET", "POST"}), ("PATCH", f"{CONTAINERS}/{'a' * 12}", {"GET", "DELETE"})])
def test_a_method_the_route_lacks_is_405_with_allow(client, memory, method, path, allowed):
    response = client.open(path, method=method, headers=auth())
    assert_refused(response, 405, "method_not_allowed", None, memory)
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


@pytest.mark.parametrize(
    "query,names",
    [
        ({"claim": "x"}, ["claim"]),
        ({"claim_id": "x", "status": "running", "all": "1"}, ["all", "status"]),
        ([("claim_id", "a"), ("claim_id", "b")], ["claim_id"]),
        ({"claim_id": "not a claim!"}, ["claim_id"]),
        ({"claim_id": "abc\n"}, ["claim_id"]),
        ({"claim_id": "a/b"}, ["claim_id"]),
        ({"claim_id": ""}, ["claim_id"]),
        ({"claim_id": "-x"}, ["claim_id"]),
    ],
)
def test_unknown_repeated_or_bad_query_parameters_are_400_naming_them(client, memory, query, names):
    body = assert_refused(client.get(CONTAINERS, query_string=query, headers=auth()), 400, "invalid_request", None, memory)
    assert sorted(body["errors"]) == names
    assert all(name in body["message"] for name in names) and "body" not in body["message"]


# --- conflicts -----------------------------------------------------------------------


def test_second_create_for_a_claim_is_409_naming_the_first(client, memory):
    first = create(client, command=["sleep", "60"])
    assert first.status_code == 201
    again = create(client, image="never/pulled:1", gpu_count=64, port_mappings=[{"host_port": 21004, "container_port": 80}])
    assert again.status_code == 409, again.get_data(as_text=True)
    assert again.get_json()["error"] == "claim_exists" and again.get_json()["container_id"] == first.get_json()["container_id"]
    assert list(memory.containers) == [first.get_json()["container_id"]]


def test_more_gpus_than_free_is_409(client, memory):
    assert create(client, "holder", gpu_count=6, command=["sleep", "60"]).status_code == 201
    [held] = memory.containers
    response = create(client, gpu_count=3, command=["sleep", "60"])
    assert response.status_code == 409, response.get_data(as_text=True)
    assert response.get_json()["error"] == "no_gpus_free" and response.get_json()["free_gpus"] == 2
    assert list(memory.containers) == [held]


def test_a_gpu_request_on_a_node_without_gpus_says_so(tmp_path, memory):
    gpuless = make_app(tmp_path, memory, gpus=GpuInventory(), UTOPIA_AGENT_GPU_BACKEND="none")
    try:
        response = create(gpuless.test_client(), gpu_count=1, command=["sleep", "60"])
    finally:
        gpuless.extensions["utopia"].close()
    body = assert_refused(response, 409, "no_gpus_free", None, memory)
    assert body["message"] == "this node has no GPUs (GPU backend none)" and body["free_gpus"] == 0


# --- engine failures: 503 while it is down, 502 when it fails, never 404 --------------


ENGINE_FAULTS = [(EngineUnavailable("the Docker engine is unreachable (test)"), 503, "engine_unavailable"),
                 (EngineError("the Docker engine failed (test): boom"), 502, "engine_error")]


@pytest.mark.parametrize("error,status,code", ENGINE_FAULTS, ids=["unavailable", "failed"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_engine_failures_on_show_and_delete_are_never_404(client, memory, error, status, code, method):
    memory.fail_next("get_managed", error)
    response = client.open(f"{CONTAINERS}/{'a' * 64}", method=method, headers=auth())
    assert_refused(response, status, code, None, memory)
    assert ("Retry-After" in response.headers) == (status == 503)


@pytest.mark.parametrize("error,status,code", ENGINE_FAULTS, ids=["unavailable", "failed"])
def test_an_engine_failure_while_removing_keeps_the_container(client, memory, error, status, code):
    container_id = create(client, command=["sleep", "60"]).get_json()["container_id"]
    memory.fail_next("remove", error)
    response = client.delete(f"{CONTAINERS}/{container_id}", headers=auth())
    assert response.status_code == status and response.get_json()["error"] == code
    assert list(memory.containers) == [container_id]
    assert client.delete(f"{CONTAINERS}/{container_id}", headers=auth()).status_code == 204
    assert memory.containers == {}


@pytest.mark.parametrize("error,status,code", ENGINE_FAULTS, ids=["unavailable", "failed"])
@pytest.mark.parametrize("method", ["find_claim", "present_image", "managed_rows", "create"])
def test_engine_failures_while_creating_leave_nothing(client, memory, error, status, code, method):
    memory.fail_next(method, error)
    response = create(client, command=["sleep", "60"], gpu_count=1)
    assert_refused(response, status, code, None, memory)
    assert ("Retry-After" in response.headers) == (status == 503)


def test_a_failed_read_under_the_lock_decides_nothing_and_the_retry_names_the_claims_container(client, memory, monkeypatch):
    """Under the lock one engine list shows the claim's container and everything held: when it
    fails nothing is decided (503, to retry), and the retry is told the claim's container."""
    existing = create(client, command=["sleep", "60"]).get_json()["container_id"]
    monkeypatch.setattr(memory, "find_claim", lambda claim_id, fresh=False: None)  # the early check missed it
    memory.fail_next("managed_rows", EngineUnavailable("the list failed (test)"))
    ports = [{"host_port": 21007, "container_port": 80}]
    failed = create(client, command=["sleep", "60"], port_mappings=ports)
    assert failed.status_code == 503 and "Retry-After" in failed.headers and list(memory.containers) == [existing]
    retried = create(client, command=["sleep", "60"], port_mappings=ports)
    assert retried.status_code == 409 and retried.get_json()["container_id"] == existing, retried.get_json()


@pytest.mark.parametrize("error,status,code", ENGINE_FAULTS, ids=["unavailable", "failed"])
def test_a_failed_start_rolls_back(client, memory, error, status, code):
    memory.fail_next("start", error)
    assert_refused(create(client, command=["sleep", "60"], gpu_count=2), status, code, None, memory)
    assert create(client, command=["sleep", "60"], gpu_count=8).status_code == 201, "the rolled-back claim's GPUs are free again"


FAKE_GPU = "GPU-fake-0000-0000-0000-000000000000"
READS_OF_THE_ENGINE = [
    ("GET", CONTAINERS, None),
    ("GET", "/api/v1/gpus", None),
    ("POST", f"/api/v1/gpus/{FAKE_GPU}/quarantine", {"reason": "fan"}),
    ("DELETE", f"/api/v1/gpus/{FAKE_GPU}/quarantine", None),
]


@pytest.mark.parametrize("error,status,code", ENGINE_FAULTS, ids=["unavailable", "failed"])
@pytest.mark.parametrize("method,path,body", READS_OF_THE_ENGINE, ids=lambda value: value if isinstance(value, str) else "")
def test_an_engine_failure_while_reading_the_containers_is_503_or_502(client, memory, error, status, code, method, path, body):
    """The GPU routes ask the engine who holds each GPU: its failure is theirs, declared (the app
    fixture fails the test on an answer a route does not declare)."""
    for engine_call in ("list_managed", "holders_of"):
        memory.fail_next(engine_call, error)
    assert_refused(client.open(path, method=method, json=body, headers=auth()), status, code, None, memory)


def test_create_show_list_delete_round_trip(client, memory):
    """The happy path, so the refusals above are refusals of a working app."""
    created = create(client, command=["sleep", "60"], gpu_count=2, port_mappings=[{"host_port": 21005, "container_port": 80}])
    assert created.status_code == 201, created.get_data(as_text=True)
    container_id = created.get_json()["container_id"]
    shown = client.get(f"{CONTAINERS}/{container_id[:12]}", headers=auth()).get_json()
    assert shown["claim_id"] == CLAIM and shown["status"] == "running" and len(shown["gpu_ids"]) == 2
    assert shown["ports"] == {"80/tcp": "21005"}
    assert [c["id"] for c in client.get(CONTAINERS, query_string={"claim_id": CLAIM}, headers=auth()).get_json()] == [container_id]
    assert client.delete(f"{CONTAINERS}/{container_id}", headers=auth()).status_code == 204
    assert memory.containers == {}


def test_a_list_is_joined_from_kept_bodies_and_dumps_only_what_changed():
    """The container list is the schema's many=True dump, byte for byte; a new list that keeps most
    objects dumps only the new ones, and the same list is not joined again."""
    from dataclasses import dataclass

    from flask import Flask
    from marshmallow import Schema, fields

    from utopia_agent.api.operations import RenderedWhileSame, json_body

    @dataclass(frozen=True)
    class Item:
        id: str
        note: str

    class ItemSchema(Schema):
        id = fields.String()
        note = fields.String()

    dumped = []

    class CountingSchema(ItemSchema):
        def dump(self, obj, *args, **kwargs):
            dumped.append(obj.id)
            return super().dump(obj, *args, **kwargs)

    rendered = RenderedWhileSame(CountingSchema())
    first = tuple(Item(f"c{n}", 'says "hi" ü') for n in range(3))
    with Flask("t").app_context():
        body = rendered.list_response(first, key=lambda item: item.id).get_data()
        assert body == json_body(ItemSchema(many=True).dump(first)) and dumped == ["c0", "c1", "c2"]
        assert rendered.list_response(first, key=lambda item: item.id).get_data() == body and len(dumped) == 3
        second = (first[0], Item("c1", "changed"), first[2], Item("c3", "new"))
        assert rendered.list_response(second, key=lambda item: item.id).get_data() == json_body(ItemSchema(many=True).dump(second))
        assert dumped[3:] == ["c1", "c3"], "only the changed and the new item are dumped again"
        assert rendered.response(second[1], key="c1").get_data() == json_body(ItemSchema().dump(second[1])) and len(dumped) == 5
        assert rendered.list_response((), key=lambda item: item.id).get_data() == b"[]\n"


def test_a_create_cut_short_by_its_workers_death_is_settled_before_the_next_decision(app, client, memory):
    """A worker killed while the engine makes its container releases the lock at once, but the engine
    may still finish: the next create finds the dead create's record, removes that container (nobody
    was told of it) and only then gives out GPUs, so none is given twice; a record whose container
    never came is dropped."""
    state_dir = app.extensions["utopia"].config.state_dir
    orphan = create(client, claim_id="cut-short", command=["sleep", "60"], gpu_count=8).get_json()["container_id"]
    name = memory.containers[orphan].name
    memory.containers[orphan] = dataclasses.replace(memory.containers[orphan], status="created", started=0)
    (state_dir / "create-in-flight.json").write_text(json.dumps({"name": name, "pid": 4242}))
    response = create(client, command=["sleep", "60"], gpu_count=8, disk_gb=1)  # not the whole disk: "after" needs some
    assert response.status_code == 201, response.get_json()
    assert orphan not in memory.containers and not (state_dir / "create-in-flight.json").exists()

    (state_dir / "create-in-flight.json").write_text(json.dumps({"name": "utopia-never-made", "pid": 4243}))
    assert create(client, claim_id="after", command=["sleep", "60"]).status_code == 201
    assert not (state_dir / "create-in-flight.json").exists()
    assert len(memory.containers) == 2, "the record of a container never made removes nothing"
