"""No GPU reaches a container that was not given it, on an engine whose default runtime is NVIDIA's.

Many GPU nodes run dockerd with `--default-runtime nvidia`. That runtime exposes the GPUs that
NVIDIA_VISIBLE_DEVICES names in the container's environment, where the image's own ENV stands
unless the create call sets the name: every nvidia/cuda image says `all`. Here a private dockerd
runs tests/support/nvidia-runtime-recorder as its default runtime, which records what the real
runtime would read, and an image that sets `all` as a CUDA image does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS
from tests.support.engine import HOOK_DIR, make_image_with
from tests.support.private_engine import running_private_engine

RECORDER = HOOK_DIR / "nvidia-runtime-recorder"
CUDA_LIKE_IMAGE = "utopia-test/cuda-like:latest"
UUIDS = [gpu.uuid for gpu in DEFAULT_TEST_GPUS]


@pytest.fixture(scope="module")
def runtime_records(tmp_path_factory) -> Path:
    """Where the stand-in runtime writes what it read, one file per container id."""
    return tmp_path_factory.mktemp("nvidia-records")


@pytest.fixture(scope="module")
def nvidia_default_engine(engine, runtime_records):
    """A private engine whose default runtime is the recording stand-in, holding the CUDA-like image."""
    with running_private_engine(
        engine.client,
        subnet="10.212",
        dockerd_args=(f"--add-runtime=nvidia={RECORDER}", "--default-runtime=nvidia"),
        env={"UTOPIA_TEST_NVIDIA_RECORDS": str(runtime_records)},
    ) as private:
        make_image_with(private.client, CUDA_LIKE_IMAGE, "ENV NVIDIA_VISIBLE_DEVICES=all", "ENV NVIDIA_DRIVER_CAPABILITIES=all")
        yield private


@pytest.fixture(scope="module")
def isolation_agent(module_agents, nvidia_default_engine):
    agent = module_agents(workers=1, DOCKER_HOST=nvidia_default_engine.base_url)
    yield agent
    agent.stop()


def runtime_saw(records: Path, container_id: str) -> dict[str, str]:
    """The NVIDIA_* variables the runtime read when it created the container (last value of each)."""
    return json.loads((records / container_id).read_text())


def test_the_stand_in_runtime_sees_what_the_image_says(nvidia_default_engine, runtime_records):
    """The premise: a container made from the image without the agent would get every GPU."""
    client = nvidia_default_engine.client
    assert client.info()["DefaultRuntime"] == "nvidia"
    container = client.containers.run(CUDA_LIKE_IMAGE, ["true"], detach=True)
    try:
        assert runtime_saw(runtime_records, container.id)["NVIDIA_VISIBLE_DEVICES"] == "all"
    finally:
        container.remove(force=True)


def test_a_claim_without_gpus_gets_none_from_an_all_gpus_image(isolation_agent, runtime_records, claim):
    response = isolation_agent.create(claim(), CUDA_LIKE_IMAGE, gpu_count=0, command=["sleep", "300"])
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    assert runtime_saw(runtime_records, container_id)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert isolation_agent.delete(f"/api/v1/containers/{container_id}").status_code == 204


def test_a_gpu_claim_gets_its_own_gpus_with_compute_capabilities_only(isolation_agent, runtime_records, claim):
    response = isolation_agent.create(claim(), CUDA_LIKE_IMAGE, gpu_count=2, command=["sleep", "300"])
    assert response.status_code == 201, response.text
    container_id = response.json()["container_id"]
    given = isolation_agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"]
    assert len(given) == 2
    seen = runtime_saw(runtime_records, container_id)
    assert seen["NVIDIA_VISIBLE_DEVICES"].split(",") == [UUIDS[i] for i in given]
    assert seen["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert isolation_agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
