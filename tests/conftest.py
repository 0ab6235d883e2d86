"""Fixtures: the real engine, a test image, the stand-in NVML, and the agent under gunicorn."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import docker
import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS, build_fake_nvml, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import AgentProcess, remove_agent_networks, unmount_under
from tests.support.certificates import Pki
from tests.support.prerequisites import require
from tests.support.polling import wait_for
from tests.support.relay import EngineRelay
from tests.support.engine import (
    TEST_IMAGE,
    EngineUnavailable,
    engine_has_nvidia_driver,
    ensure_engine,
    ensure_test_image,
    TEST_HOST_PORT_RANGE,
    free_port,
    image_ids,
    remove_images,
    remove_new_dangling_images,
)

RUN_ID = uuid.uuid4().hex[:6]
TEST_DEFAULT_CPUS, TEST_DEFAULT_MEMORY_MB = "0.05", "128"


def pytest_collection_modifyitems(items):
    """A test that reaches the engine (through any fixture) is a `docker` test: `-m "not docker"`
    then selects exactly what runs on a machine without one. This is the only place the marker is
    set: a test that needs the engine asks for the `engine` fixture (directly or through another)."""
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session", autouse=True)
def _unmount_leftovers(tmp_path_factory):
    """Agents started by tests mount their pins (and a tmpfs for them) in their state dirs: unmount
    whatever is left under this run's temp dir, so nothing outlives the run."""
    yield
    unmount_under(tmp_path_factory.getbasetemp())
    # Here too, not only in `engine`'s teardown: a run of tests that never asked for the engine
    # still starts agents, and an agent whose workers fail to boot never runs its on_exit
    # (gunicorn's halt re-raises before it), so nothing of its own removes its network.
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException:
        client = None
    remove_agent_networks(client, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """The real Docker engine (started here when none answers, and stopped again at the end)."""
    try:
        handle = ensure_engine()
    except EngineUnavailable as exc:
        require(False, f"no Docker engine: {exc}")
    images_before = image_ids(handle.client)
    yield handle
    remove_run_containers(handle.client)
    remove_agent_networks(handle.client, tmp_path_factory.getbasetemp())
    remove_new_dangling_images(handle.client, images_before)
    handle.stop()


@pytest.fixture
def relay(engine):
    """A relay in front of the engine the tests use (counts requests, fails them on cue); closed after the test."""
    upstream = engine.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    require(upstream.startswith("unix://"), f"the relay forwards to a unix socket, not {upstream}")
    running = EngineRelay(upstream).start()
    yield running
    running.close()


@pytest.fixture(scope="session")
def docker_client(engine):
    return engine.client


@pytest.fixture(scope="session")
def test_image(docker_client):
    """A busybox image imported locally (sh, sleep, env, cat, httpd); removed again if this run made it."""
    existed = bool(docker_client.images.list(name=TEST_IMAGE))
    yield ensure_test_image(docker_client)
    if not existed:
        remove_run_containers(docker_client)
        remove_images(docker_client, [TEST_IMAGE])


@pytest.fixture(scope="session")
def nvidia_path(docker_client, test_image) -> None:
    """The engine attaches GPUs through its NVIDIA device path (dockerd started with the stand-in hook on its PATH)."""
    require(engine_has_nvidia_driver(docker_client, test_image),
        "the engine has no nvidia device driver: start dockerd with tests/support on its PATH (make test does)")


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def claim(request) -> ClaimNames:
    """Claim ids unique to this run and test, so cleanup never touches anyone else's."""
    return ClaimNames(f"t{RUN_ID}-{request.node.name[:24]}".replace("[", "-").replace("]", "").replace("_", "-"))


class ClaimNames:
    def __init__(self, prefix: str):
        self.prefix = prefix[:48]

    def __call__(self, suffix: str = "0") -> str:
        return f"{self.prefix}-{suffix}"


def remove_run_containers(client) -> set[str]:
    """Remove every managed container whose claim this run made; return their claim ids."""
    removed = set()
    for container in client.containers.list(all=True, filters={"label": "utopia.managed=true"}, ignore_removed=True):
        claim_id = container.labels.get("utopia.claim_id", "")
        if claim_id.startswith(f"t{RUN_ID}-"):
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            removed.add(claim_id)
    return removed


def clean_up_test_containers(request, client) -> None:
    """Remove the containers this run made; when the test shares the agent, wait until it no longer
    lists them (it learns of removals made behind its back from the engine's events), so the next
    test never reads the previous one's GPUs. Running it twice removes nothing the second time."""
    removed = remove_run_containers(client)
    if removed and "agent" in request.fixturenames:
        agent = request.getfixturevalue("agent")

        def forgotten() -> bool:
            return not removed & {shown["claim_id"] for shown in agent.get("/api/v1/containers").json()}

        assert wait_for(forgotten, timeout=10), f"the shared agent still lists {sorted(removed)}"


@pytest.fixture(autouse=True)
def _remove_test_containers(request):
    """After each test, remove the containers it made through the agent."""
    yield
    if "docker_client" in request.fixturenames:
        clean_up_test_containers(request, request.getfixturevalue("docker_client"))


class AgentFactory:
    """Starts agents with the stand-in NVML (8 GPUs unless told otherwise) and stops them all."""

    def __init__(self, tmp_path_factory, fake_nvml_dir: Path):
        self._tmp = tmp_path_factory
        self._nvml_dir = fake_nvml_dir
        self.started: list[AgentProcess] = []

    def __call__(self, workers: int = 2, gpus=None, start: bool = True, numa_cpus: str | None = None,
                 ca_file: Path | None = None, client_cert: tuple[Path, Path] | None = None, **env: str) -> AgentProcess:
        """`numa_cpus`: the stand-in's CPUs per numa node (see write_fake_nvml_config); `ca_file` and
        `client_cert`: what its clients use on HTTPS (see AgentProcess)."""
        state_dir = self._tmp.mktemp("agent")
        nvml_config = write_fake_nvml_config(state_dir / "nvml.conf", DEFAULT_TEST_GPUS if gpus is None else gpus, numa_cpus=numa_cpus)
        (state_dir / "volumes").mkdir(exist_ok=True)
        base = {
            "UTOPIA_AGENT_GPU_BACKEND": "nvml",
            "UTOPIA_AGENT_STOP_TIMEOUT": "1",
            "UTOPIA_AGENT_HOST_PORT_RANGE": "{}-{}".format(*TEST_HOST_PORT_RANGE),
            "UTOPIA_AGENT_RESTART_POLICY": "no",
            # What this 2-core machine affords each claim without GPUs, so a test's many claims fit.
            "UTOPIA_AGENT_DEFAULT_CPUS": TEST_DEFAULT_CPUS,
            "UTOPIA_AGENT_DEFAULT_MEMORY_MB": TEST_DEFAULT_MEMORY_MB,
            **env,
        }
        agent = AgentProcess(state_dir, free_port(), fake_nvml_env(self._nvml_dir, nvml_config, {**os.environ, **base}), workers,
                             ca_file=ca_file, client_cert=client_cert)
        agent.nvml_config = nvml_config
        self.started.append(agent)
        return agent.start() if start else agent

    def stop_all(self) -> None:
        """Stop every agent started here: all are told at once, then each is waited for."""
        for agent in self.started:
            agent.signal_stop()
        for agent in self.started:
            agent.stop()


@pytest.fixture
def agent_factory(request, tmp_path_factory, fake_nvml_dir, engine):
    """Agents for one test, stopped when it ends, once its containers are gone (so each leaves
    its claims network and rules behind it). Agents left running would all watch every managed
    container on the engine: another test's agent would stop a claim past its disk before the
    test's own agent saw it, and dozens of idle agents polling slow the whole run."""
    factory = AgentFactory(tmp_path_factory, fake_nvml_dir)
    yield factory
    try:
        if factory.started:
            clean_up_test_containers(request, engine.client)
    finally:  # a failed cleanup (the shared agent still listing them) must not leave the agents running
        factory.stop_all()


@pytest.fixture(scope="module")
def module_agents(tmp_path_factory, fake_nvml_dir, engine):
    """Agents a module's tests share (a fixture of module scope starts them), stopped after its last test."""
    factory = AgentFactory(tmp_path_factory, fake_nvml_dir)
    yield factory
    try:
        if factory.started:
            remove_run_containers(engine.client)
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def agent(tmp_path_factory, fake_nvml_dir, engine, test_image) -> AgentProcess:
    """One agent of 2 workers on 8 stand-in GPUs, shared by the tests that need no special config."""
    factory = AgentFactory(tmp_path_factory, fake_nvml_dir)
    try:
        yield factory(workers=2)
        remove_run_containers(engine.client)
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A CA made with openssl for the HTTPS tests, with a server and a client pair it signed."""
    return Pki.make(tmp_path_factory.mktemp("tls"))
