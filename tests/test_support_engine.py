"""The test helpers themselves work against the real engine (tests/support/engine.py).

If these fail, every test built on them would fail for reasons that have nothing
to do with the agent, so they say first that the ground is solid.
"""

from __future__ import annotations

import threading
import time
import uuid

import docker
import docker.errors
import pytest
from docker.types import DeviceRequest

from tests.support.polling import wait_for
from tests.support.engine import (
    TEST_IMAGE,
    Registry,
    SilentRegistry,
    SlowRegistry,
    ensure_test_image,
    make_unique_image,
    remove_containers,
    remove_images,
)

LABEL = "utopia-test.support"


@pytest.fixture
def client(engine):
    client = engine.client
    ensure_test_image(client)
    yield client
    remove_containers(client, LABEL)


@pytest.fixture
def unique_tag(client):
    """A fresh image tag, removed afterwards with anything pulled under it."""
    tag = f"utopia-test/unique-{uuid.uuid4().hex[:8]}:1"
    refs = [tag]
    yield tag, refs
    remove_images(client, refs)


def _pull_in_thread(client, ref):
    """Start a pull that the test can watch without blocking on it (the SDK's pull has no timeout)."""
    outcome: dict = {}

    def pull():
        try:
            outcome["image"] = client.images.pull(ref)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    return thread, outcome


def test_test_image_runs_echo(client):
    assert ensure_test_image(client) == TEST_IMAGE
    out = client.containers.run(TEST_IMAGE, ["echo", "hi"], remove=True, labels={LABEL: "1"})
    assert out == b"hi\n"
    assert client.images.get(TEST_IMAGE).attrs["Config"]["Cmd"] == ["/bin/sh"]


def test_registry_push_then_pull_and_unknown_manifest(client, unique_tag):
    tag, refs = unique_tag
    make_unique_image(client, tag, payload_kib=8)
    with Registry() as registry:
        ref = registry.push(client, tag, "t/busybox:1")
        refs.append(ref)
        remove_images(client, [tag])  # else the engine has the layer and the pull is a no-op
        assert ref == f"localhost:{registry.port}/t/busybox:1"
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(ref)

        client.images.pull(ref)
        out = client.containers.run(ref, ["echo", "pulled"], remove=True, labels={LABEL: "1"})
        assert out == b"pulled\n"

        with pytest.raises(docker.errors.APIError, match="manifest unknown"):
            client.images.pull(registry.ref("t/nope:1"))
        storage = registry.dir
    assert registry.process is None and not storage.exists()


def test_hook_gives_the_requested_gpus(client, nvidia_path):
    """The output is read until it is there: the engine can answer a wait before its log driver
    has written what the container printed (which `run(remove=True)` then returned as empty)."""
    container = client.containers.run(
        TEST_IMAGE, ["cat", "/proc/1/environ"], detach=True, labels={LABEL: "1"},
        device_requests=[DeviceRequest(
            driver="nvidia", device_ids=["GPU-aaaa", "GPU-bbbb"], capabilities=[["gpu"]],
        )],
    )
    try:
        container.wait(timeout=30)
        out = wait_for(container.logs, timeout=10)
    finally:
        container.remove(force=True)
    assert b"NVIDIA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb" in out.split(b"\0")


def test_silent_registry_hangs_a_pull(client):
    silent = SilentRegistry().start()
    try:
        started = time.monotonic()
        thread, outcome = _pull_in_thread(client, silent.ref("t/busybox:1"))
        thread.join(3)
        assert thread.is_alive(), f"pull did not hang: {outcome}"
        assert silent.connections >= 1
    finally:
        silent.stop()
    thread.join(60)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), docker.errors.APIError)
    assert time.monotonic() - started < 60


def test_slow_registry_throttles_then_releases(client, unique_tag):
    tag, refs = unique_tag
    make_unique_image(client, tag, payload_kib=8)
    with Registry() as registry:
        registry.push(client, tag, "t/slow:1")
        refs.append(registry.ref("t/slow:1"))
        remove_images(client, [tag])

        with SlowRegistry(registry, kib_per_s=512) as slow:
            ref = slow.ref("t/slow:1")
            refs.append(ref)
            started = time.monotonic()
            client.images.pull(ref)
            elapsed = time.monotonic() - started
            out = client.containers.run(ref, ["echo", "slow"], remove=True, labels={LABEL: "1"})
        assert out == b"slow\n"
        # About 1 MiB of layer at 512 KiB/s: a couple of seconds, not instant.
        assert elapsed > 1.0
        remove_images(client, [ref])

        stalled = SlowRegistry(registry, kib_per_s=0).start()
        try:
            thread, outcome = _pull_in_thread(client, stalled.ref("t/slow:1"))
            refs.append(stalled.ref("t/slow:1"))
            thread.join(3)
            assert thread.is_alive(), f"pull did not stall: {outcome}"
        finally:
            stalled.stop()
        thread.join(30)
        assert "image" in outcome, outcome
