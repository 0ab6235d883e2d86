"""Private images: a registry that wants credentials (htpasswd on loopback), the credentials
going nowhere but the engine's request, and a cached private image given only to a create whose
credentials the registry accepts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import remove_run_containers
from tests.support.engine import Registry, SlowRegistry, make_unique_image, remove_images

ALICE_PASSWORD = "alice-Secret-4f1c9e"
CAROL_PASSWORD = "carol-Secret-8b2d7a"
BOB_PASSWORD = "bob-Secret-3e6a0c"
PASSWORDS = (ALICE_PASSWORD, CAROL_PASSWORD, BOB_PASSWORD)


@pytest.fixture(scope="module")
def private_registry(engine):
    """Alice and Carol may pull from it; Bob is a user of another registry."""
    with Registry(users={"alice": ALICE_PASSWORD, "carol": CAROL_PASSWORD}) as running:
        yield running


@pytest.fixture(scope="module")
def other_registry(engine):
    with Registry(users={"bob": BOB_PASSWORD}) as running:
        yield running


@pytest.fixture
def private_image(private_registry, docker_client, test_image, request):
    """An image only the private registry holds, so a create must pull it with credentials."""
    source = make_unique_image(docker_client, f"utopia-test/private:{time.monotonic_ns()}")
    ref = private_registry.push(docker_client, source, f"t/private-{time.monotonic_ns()}:1")
    remove_images(docker_client, [source])
    yield ref
    remove_run_containers(docker_client)
    remove_images(docker_client, [ref])


def alice(registry):
    return registry.credentials("alice")


def wrong_password(registry):
    return {"username": "alice", "password": "not-" + ALICE_PASSWORD}


def bob(other):
    return other.credentials("bob")


def claim_containers(docker_client, claim_id):
    return docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim_id}"})


def private_records(agent) -> dict:
    path = agent.state_dir / "pulled-images.json"
    return {ref: record for ref, record in (json.loads(path.read_text()) if path.exists() else {}).items() if record["private"]}


def assert_refused_unavailable(response, docker_client, claim_id):
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "image_unavailable", response.text
    assert claim_containers(docker_client, claim_id) == []
    assert not any(password in response.text for password in PASSWORDS)


def agent_process_texts(agent) -> list[bytes]:
    """The cmdline and environ of the agent's gunicorn master and every worker."""
    texts = []
    for pid in [agent.process.pid, *agent.worker_pids()]:
        for name in ("cmdline", "environ"):
            texts.append(Path(f"/proc/{pid}/{name}").read_bytes())
    return texts


def state_dir_bytes(agent) -> list[tuple[Path, bytes]]:
    return [(path, path.read_bytes()) for path in agent.state_dir.rglob("*") if path.is_file()]


def test_right_credentials_pull_and_run_and_the_password_goes_nowhere_else(agent, docker_client, private_registry, private_image, claim):
    response = agent.create(claim(), private_image, command=["sleep", "300"], registry_auth=alice(private_registry))
    assert response.status_code == 201, response.text
    container = docker_client.containers.get(response.json()["container_id"])
    assert container.status == "running"
    record = private_records(agent)[private_image]
    assert record["id"] == docker_client.images.get(private_image).id and len(record["owners"]) == 1
    answers = [response.text, agent.get("/api/v1/containers").text, agent.get(f"/api/v1/containers/{container.id}").text,
               agent.get("/metrics").text, agent.get("/api/v1/node").text]
    inspected = json.dumps(docker_client.api.inspect_container(container.id))
    secret = ALICE_PASSWORD.encode()
    assert ALICE_PASSWORD not in agent.log(), "the agent's log"
    assert ALICE_PASSWORD not in inspected, "docker inspect of the container"
    assert [path for path, data in state_dir_bytes(agent) if secret in data] == [], "the state dir"
    assert not any(secret in text for text in agent_process_texts(agent)), "/proc/<pid>/cmdline and environ"
    assert not any(ALICE_PASSWORD in text for text in answers), "the answers and /metrics"
    assert f"image pull finished image={private_image}" in agent.log()


@pytest.mark.parametrize("credentials", ["none", "wrong password", "another registry's user"])
def test_wrong_or_missing_credentials_are_400_and_leave_nothing(agent, docker_client, private_registry, other_registry, private_image,
                                                                 claim, credentials):
    auth = {"none": None, "wrong password": wrong_password(private_registry), "another registry's user": bob(other_registry)}[credentials]
    response = agent.create(claim(), private_image, command=["sleep", "300"], **({"registry_auth": auth} if auth else {}))
    assert_refused_unavailable(response, docker_client, claim())
    assert docker_client.images.list(name=private_image.rsplit(":", 1)[0]) == []
    assert private_image not in private_records(agent), "a pull that brought nothing leaves no private mark"
    assert not any(password in agent.log() for password in PASSWORDS)


def test_unknown_tag_in_a_private_registry_is_400(agent, docker_client, private_registry, claim):
    response = agent.create(claim(), private_registry.ref("t/nope:1"), command=["sleep", "300"], registry_auth=alice(private_registry))
    assert_refused_unavailable(response, docker_client, claim())
    assert "manifest unknown" in response.json()["message"]


def test_a_cached_private_image_is_given_only_to_credentials_its_registry_accepts(agent, docker_client, private_registry, other_registry,
                                                                                  private_image, claim):
    assert agent.create(claim("owner"), private_image, command=["sleep", "300"], registry_auth=alice(private_registry)).status_code == 201
    image_id = docker_client.images.get(private_image).id
    refused = {
        "none": {},
        "wrong password": {"registry_auth": wrong_password(private_registry)},
        "another registry's user": {"registry_auth": bob(other_registry)},
    }
    for name, fields in refused.items():
        assert_refused_unavailable(agent.create(claim(name.replace(" ", "-").replace("'", "")), private_image, command=["sleep", "300"], **fields),
                                   docker_client, claim(name))
    by_id = agent.create(claim("by-id"), image_id, command=["sleep", "300"])
    assert_refused_unavailable(by_id, docker_client, claim("by-id"))
    assert "private" in by_id.json()["message"]
    for name, auth in {"alice": alice(private_registry), "carol": private_registry.credentials("carol")}.items():
        given = agent.create(claim(name), private_image, command=["sleep", "300"], registry_auth=auth)
        assert given.status_code == 201, given.text
    assert agent.create(claim("alice-by-id"), image_id, command=["sleep", "300"], registry_auth=alice(private_registry)).status_code == 201
    assert docker_client.images.get(private_image).id == image_id


def test_public_and_preloaded_images_need_no_credentials(agent, docker_client, test_image, claim):
    assert agent.create(claim("preloaded"), test_image, command=["sleep", "300"]).status_code == 201
    assert test_image not in private_records(agent)


def test_a_public_pull_is_public_and_a_cached_one_needs_no_registry(agent, docker_client, test_image, claim):
    with Registry() as public:
        source = make_unique_image(docker_client, f"utopia-test/public:{time.monotonic_ns()}")
        ref = public.push(docker_client, source, "t/public:1")
        remove_images(docker_client, [source])
        try:
            assert agent.create(claim("first"), ref, command=["sleep", "300"]).status_code == 201
            public.stop()
            again = agent.create(claim("second"), ref, command=["sleep", "300"])
            assert again.status_code == 201, again.text
            assert ref not in private_records(agent)
        finally:
            remove_run_containers(docker_client)
            remove_images(docker_client, [ref])


def test_a_cached_private_image_cannot_be_checked_while_its_registry_is_down(agent, docker_client, test_image, claim):
    with Registry(users={"alice": ALICE_PASSWORD}) as registry:
        source = make_unique_image(docker_client, f"utopia-test/private:{time.monotonic_ns()}")
        ref = registry.push(docker_client, source, "t/down:1")
        remove_images(docker_client, [source])
        try:
            assert agent.create(claim("first"), ref, command=["sleep", "300"], registry_auth=alice(registry)).status_code == 201
            registry.stop()
            response = agent.create(claim("second"), ref, command=["sleep", "300"], registry_auth=alice(registry))
            assert response.status_code == 502, response.text
            assert response.json()["error"] == "image_pull_failed" and claim_containers(docker_client, claim("second")) == []
        finally:
            remove_run_containers(docker_client)
            remove_images(docker_client, [ref])


def test_two_creates_pulling_one_image_with_different_credentials_never_share_the_pull(agent, docker_client, private_registry, private_image,
                                                                                       claim):
    with SlowRegistry(private_registry, kib_per_s=0) as held:
        ref = held.ref(private_image.split("/", 1)[1])
        outcome = {}

        def create_right():
            outcome["right"] = agent.create(claim("right"), ref, command=["sleep", "300"], registry_auth=alice(private_registry))

        right = threading.Thread(target=create_right)
        right.start()
        try:
            assert held.holding.wait(30), "the engine is downloading a layer the registry holds back"
            wrong = agent.create(claim("wrong"), ref, command=["sleep", "300"], registry_auth=wrong_password(private_registry))
            assert right.is_alive(), "the wrong credentials were refused while the right ones' pull was still held"
            assert_refused_unavailable(wrong, docker_client, claim("wrong"))
        finally:
            held.stop()
            right.join(60)
    try:
        assert outcome["right"].status_code == 201, outcome["right"].text
    finally:
        remove_run_containers(docker_client)
        remove_images(docker_client, [ref])
