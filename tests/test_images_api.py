"""The node's images through the agent: pulls ahead with their progress, the listing, removal,
and image collection, against the real engine and Debian's registry on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import remove_run_containers
from tests.support.engine import Registry, SlowRegistry, ensure_engine, make_unique_image, remove_images
from tests.support.polling import wait_for
from tests.support.scrape import sample, scrape
from tests.test_cli import api_env, run_cli
from utopia_agent.client import AgentClient, ImageUnavailable, NotFound

PASSWORD = "dana-Secret-5c1e77"


@pytest.fixture(scope="module")
def registry(engine):
    with Registry() as running:
        yield running


@pytest.fixture
def pushed(registry, docker_client, test_image):
    """Images that exist only in the loopback registry; each is removed from the engine afterwards."""
    refs = []

    def push(payload_kib: int = 64, into: Registry | None = None) -> str:
        source = make_unique_image(docker_client, f"utopia-test/images-api:{time.monotonic_ns()}", payload_kib=payload_kib)
        ref = (into or registry).push(docker_client, source, f"t/images-{time.monotonic_ns()}:1")
        remove_images(docker_client, [source])
        refs.append(ref)
        return ref

    yield push
    remove_run_containers(docker_client)
    remove_images(docker_client, refs)


def listed(agent, ref: str) -> dict | None:
    response = agent.get("/api/v1/images")
    assert response.status_code == 200, response.text
    return next((entry for entry in response.json() if entry["image"] == ref), None)


def present(agent, ref: str) -> dict | None:
    entry = listed(agent, ref)
    return entry if entry and entry["state"] == "present" else None


def test_a_pulled_ahead_image_is_created_with_its_registry_stopped(agent, docker_client, pushed, claim):
    with Registry() as own:
        ref = pushed(into=own)
        response = agent.post("/api/v1/images", json={"image": ref})
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "pulling" and response.json()["image"] == ref
        entry = wait_for(lambda: present(agent, ref), 60)
        assert entry, listed(agent, ref)
        assert entry["origin"] == "pulled" and entry["id"] == docker_client.images.get(ref).id and entry["size_mb"] > 0
        assert agent.post("/api/v1/images", json={"image": ref}).status_code == 200, "already present"
    created = agent.create(claim(), ref, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    entry = present(agent, ref)
    assert entry["claims"] == [claim()] and entry["last_used"] >= int(time.time()) - 5


def test_a_private_image_pulled_ahead_needs_credentials_and_stays_private(agent, docker_client, pushed, claim):
    with Registry(users={"dana": PASSWORD}) as private:
        ref = pushed(into=private)
        refused = agent.post("/api/v1/images", json={"image": ref, "registry_auth": {"username": "dana", "password": "wrong"}})
        assert refused.status_code == 202, "the registry answers the pull, in the background"
        failed = wait_for(lambda: (listed(agent, ref) or {}).get("state") == "failed" and listed(agent, ref), 60)
        assert failed and "unauthorized" in failed["error"] and PASSWORD not in failed["error"]
        assert agent.post("/api/v1/images", json={"image": ref, "registry_auth": private.credentials("dana")}).status_code == 202
        assert wait_for(lambda: present(agent, ref), 60)["origin"] == "pulled_private"
        assert agent.post("/api/v1/images", json={"image": ref}).status_code == 400, "no credentials for a private image"
        assert agent.create(claim(), ref, command=["sleep", "300"]).status_code == 400
        assert agent.create(claim(), ref, command=["sleep", "300"], registry_auth=private.credentials("dana")).status_code == 201
        assert PASSWORD not in agent.get("/api/v1/images").text


def test_progress_shows_while_a_pull_runs(agent, docker_client, registry, pushed):
    ref = pushed(payload_kib=2048)
    with SlowRegistry(registry, kib_per_s=256) as slow:
        slow_ref = slow.ref(ref.split("/", 1)[1])
        try:
            assert agent.post("/api/v1/images", json={"image": slow_ref}).status_code == 202
            seen = wait_for(lambda: (e := listed(agent, slow_ref)) and e["state"] == "pulling" and e["progress"]["downloaded_bytes"] > 0 and e, 30)
            assert seen, listed(agent, slow_ref)
            assert seen["progress"]["total_bytes"] >= seen["progress"]["downloaded_bytes"]
            assert wait_for(lambda: present(agent, slow_ref), 60)
        finally:
            remove_images(docker_client, [slow_ref])


def _pulling_worker(agent, ref: str) -> int | None:
    """The pid of the worker pulling `ref`, from the pull's file in the state dir."""
    for path in (agent.state_dir / "pulls").glob("*.json"):
        record = json.loads(path.read_text() or "{}")
        if record.get("image") == ref and record.get("state") == "pulling":
            return record["pid"]
    return None


def _unless_reset(read, *args):
    """`read(*args)`, or None where a kept-alive connection to a killed worker was reset."""
    try:
        return read(*args)
    except requests.ConnectionError:
        return None


def test_a_pull_ahead_outlives_its_worker(agent_factory, docker_client, registry, pushed):
    """A worker SIGKILLed mid-pull: another takes the pull over and finishes it; a pull with credentials,
    which are never written down for another worker, is listed failed with the reason."""
    agent = agent_factory(workers=2)
    ref = pushed(payload_kib=1024)
    with Registry(users={"dana": PASSWORD}) as private_registry, SlowRegistry(registry, kib_per_s=128) as slow, \
            SlowRegistry(private_registry, kib_per_s=64) as slow_private:
        private_ref = pushed(payload_kib=1024, into=private_registry)
        slow_ref = slow.ref(ref.split("/", 1)[1])
        slow_private_ref = slow_private.ref(private_ref.split("/", 1)[1])
        try:
            assert agent.post("/api/v1/images", json={"image": slow_ref}).status_code == 202
            assert agent.post("/api/v1/images", json={"image": slow_private_ref, "registry_auth": private_registry.credentials("dana")}).status_code == 202
            pids = wait_for(lambda: (a := _pulling_worker(agent, slow_ref)) and (b := _pulling_worker(agent, slow_private_ref)) and {a, b}, 30)
            assert pids and wait_for(lambda: (e := listed(agent, slow_ref)) and e["progress"]["downloaded_bytes"] > 0, 30), "a pull in flight"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: _unless_reset(present, agent, slow_ref), 90), listed(agent, slow_ref)
            assert "image pull taken over image=" + slow_ref in agent.log()
            failed = wait_for(lambda: (e := _unless_reset(listed, agent, slow_private_ref)) and e["state"] == "failed" and e, 30)
            assert failed and "pull again with its credentials" in failed["error"], listed(agent, slow_private_ref)
            assert PASSWORD not in agent.log() + "".join(path.read_text() for path in (agent.state_dir / "pulls").glob("*"))
        finally:
            remove_images(docker_client, [slow_ref, slow_private_ref])


def test_an_image_in_use_is_not_removed_and_an_unused_one_is(agent, docker_client, pushed, claim):
    ref = pushed()
    created = agent.create(claim(), ref, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    in_use = agent.delete(f"/api/v1/images/{ref}")
    assert in_use.status_code == 409 and in_use.json()["error"] == "image_in_use" and claim() in in_use.json()["message"]
    assert agent.delete(f"/api/v1/containers/{created.json()['container_id']}").status_code == 204
    assert agent.delete(f"/api/v1/images/{ref}").status_code == 204
    assert docker_client.images.list(name=ref.rsplit(":", 1)[0]) == [] and listed(agent, ref) is None
    assert agent.delete(f"/api/v1/images/{ref}").json()["error"] == "not_found"


def test_collection_removes_an_unused_pulled_image_and_keeps_one_in_use_and_a_preloaded_one(agent_factory, docker_client, test_image, pushed,
                                                                                             claim):
    agent = agent_factory(UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT="1", UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT="0",
                          UTOPIA_AGENT_IMAGE_GC_MIN_AGE="0", UTOPIA_AGENT_IMAGE_GC_INTERVAL="1")
    unused, used = pushed(), pushed()
    first = agent.create(claim("unused"), unused, command=["sleep", "300"])
    assert first.status_code == 201, first.text
    assert agent.create(claim("used"), used, command=["sleep", "300"]).status_code == 201
    assert agent.delete(f"/api/v1/containers/{first.json()['container_id']}").status_code == 204
    assert wait_for(lambda: docker_client.images.list(name=unused.rsplit(":", 1)[0]) == [], 30), "the unused pulled image was collected"
    time.sleep(2)  # two more looks
    assert docker_client.images.get(used) and docker_client.images.get(test_image), "in use, and preloaded: kept"
    assert f"image collected image={unused}" in agent.log()
    families = scrape(agent)
    assert sample(families, "utopia_agent_images_collected_total") >= 1
    assert sample(families, "utopia_agent_image_store_over_high_mark") == 1, "what remains is still over a 1% mark"
    assert sample(families, "utopia_agent_images") >= 2


def test_collection_keeps_a_recently_used_image(agent_factory, docker_client, pushed, claim):
    agent = agent_factory(UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT="1", UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT="0",
                          UTOPIA_AGENT_IMAGE_GC_MIN_AGE="3600", UTOPIA_AGENT_IMAGE_GC_INTERVAL="1")
    ref = pushed()
    created = agent.create(claim(), ref, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    assert agent.delete(f"/api/v1/containers/{created.json()['container_id']}").status_code == 204
    time.sleep(3)
    assert docker_client.images.get(ref), "last used under the minimum age ago: kept"
    assert sample(scrape(agent), "utopia_agent_images") >= 1


def test_the_client_and_the_cli_pull_list_and_remove(agent, docker_client, pushed):
    with Registry(users={"dana": PASSWORD}) as private:
        ref = pushed(into=private)
        env = api_env(agent)
        refused = run_cli("pull", ref, "--username", "dana", "--password-stdin", env=env, input="wrong\n")
        assert refused.returncode == 0 and f"{ref}: pulling" in refused.stdout, "refused in the background"
        pulled = run_cli("pull", ref, "--username", "dana", "--password-stdin", env=env, input=PASSWORD + "\n")
        assert pulled.returncode == 0, pulled.stderr
        with AgentClient(agent.base_url, agent.token) as client:
            assert wait_for(lambda: any(i.image == ref and i.state == "present" for i in client.images()), 60)
            [image] = [i for i in client.images() if i.image == ref and i.state == "present"]
            assert image.origin == "pulled_private" and image.id == docker_client.images.get(ref).id
            with pytest.raises(ImageUnavailable):
                client.pull(ref)
            assert client.pull(ref, registry_auth=private.credentials("dana")).state == "present"
        listing = run_cli("images", env=env)
        assert listing.returncode == 0 and listing.stdout.split("\n")[0].split()[:5] == ["IMAGE", "ID", "SIZE", "ORIGIN", "STATE"]
        assert any(row.split()[0] == ref and "pulled_private" in row for row in listing.stdout.splitlines())
        assert PASSWORD not in listing.stdout + run_cli("images", "--json", env=env).stdout
        removed = run_cli("rmi", ref, env=env)
        assert removed.returncode == 0 and removed.stdout.strip() == ref, removed.stderr
        assert docker_client.images.list(name=ref.rsplit(":", 1)[0]) == []
        with AgentClient(agent.base_url, agent.token) as client, pytest.raises(NotFound):
            client.remove_image(ref)


@pytest.fixture
def small_engine():
    """A dockerd of its own whose data root is a 96 MiB tmpfs: an image store that fills. Its
    directory is short: containerd's socket path under it must fit a unix socket's 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="utopia-small-engine-"))
    data = root / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(data)], check=True)
    url = f"unix://{root}/docker.sock"
    # A bridge of its own: with --bridge=none a dockerd deletes docker0, the shared engine's bridge.
    bridge = f"usm{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"10.251.{int(bridge[3:5], 16)}.1/24", "dev", bridge], check=True)
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
    handle = None
    try:
        handle = ensure_engine(base_url=url, dockerd_args=(
            "--host", url, "--data-root", str(data), "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
            "--iptables=false", "--ip-masq=false", f"--bridge={bridge}"))
        assert handle.started_by_us
        yield handle, data
    finally:
        if handle is not None:
            handle.stop()
            handle.log_path.unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(data)], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_pull_the_image_store_cannot_hold_is_507_and_leaves_nothing(agent_factory, small_engine, pushed, claim):
    handle, data = small_engine
    ref = pushed(payload_kib=128 * 1024)
    used_before = shutil.disk_usage(data).used
    agent = agent_factory(DOCKER_HOST=handle.base_url)
    response = agent.create(claim(), ref, command=["sleep", "300"])
    assert response.status_code == 507, response.text
    assert response.json()["error"] == "insufficient_storage" and response.json()["image"] == ref
    assert handle.client.containers.list(all=True) == [] and handle.client.images.list(all=True) == []
    assert shutil.disk_usage(data).used - used_before < 8 * 1024 * 1024, "the failed pull's downloads are gone"
    assert "image pull failed" in agent.log() and sample(scrape(agent), "utopia_agent_image_pull_duration_seconds_count", outcome="failed") == 2
