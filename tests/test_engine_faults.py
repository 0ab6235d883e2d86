"""Engine outage and recovery, on a private dockerd so the shared engine is never touched.

The private engine has its own data root, exec root (and so its own containerd), pidfile,
socket and bridge. It must never run with `--bridge=none`: that removes the interface named
docker0, which belongs to the shared engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.support.engine import EngineHandle, ensure_engine, ensure_test_image
from tests.support.polling import wait_for
from tests.support.prerequisites import require

ENGINE_TIMEOUT = 2.0
# What a 503 may take beyond the engine timeout: the request itself, and a slow CI machine.
MARGIN = 3.0
# /health trusts an engine answer this recent (api/health.py), so an outage shows after it.
HEALTH_TRUST = 2.0


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except OSError:
        return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class PrivateEngine:
    """A second dockerd on its own socket and bridge, stopped and started by the test."""

    def __init__(self, root: Path):
        self.root = root
        self.socket = root / "docker.sock"
        self.base_url = f"unix://{self.socket}"
        self.bridge = f"utb{uuid.uuid4().hex[:8]}"
        self.handle: EngineHandle | None = None
        self.logs: list[Path] = []

    @property
    def args(self) -> tuple[str, ...]:
        return (
            f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}", f"--host={self.base_url}",
            f"--bridge={self.bridge}", "--iptables=false", "--ip-masq=false",
            # Claim containers run `sleep`, which ignores SIGTERM as PID 1: do not wait 10 s for each.
            "--shutdown-timeout=1",
        )

    def create_bridge(self) -> None:
        third = int(self.bridge[3:5], 16)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.213.{third}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def start(self) -> "PrivateEngine":
        self.handle = ensure_engine(base_url=self.base_url, dockerd_args=self.args, client_timeout=30)
        assert self.handle.started_by_us, "something else answered on the private engine's socket"
        self.logs.append(self.handle.log_path)
        return self

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()
            self.handle = None

    @property
    def client(self):
        return self.handle.client

    def remove_all(self) -> None:
        """Everything in this engine belongs to this module, so every container goes."""
        for container in self.client.containers.list(all=True):
            container.remove(force=True, v=True)

    def destroy(self) -> None:
        self.stop()
        if _ifindex(self.bridge) is not None:
            _ip("link", "delete", self.bridge)
        shutil.rmtree(self.root, ignore_errors=True)
        for log in self.logs:
            log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def private_engine(engine):
    """The private engine with the test image; docker0 of the shared engine must survive it."""
    require(
        os.geteuid() == 0 and shutil.which("dockerd") is not None and shutil.which("ip") is not None,
        "a private dockerd needs root, dockerd and ip (.ci/run installs docker.io and iproute2)",
    )
    docker0 = _ifindex("docker0")
    # A short root: dockerd's and containerd's unix socket paths must stay under 108 bytes.
    private = PrivateEngine(Path(tempfile.mkdtemp(prefix="utopia-eng-", dir="/tmp")))
    try:
        private.create_bridge()
        private.start()
        ensure_test_image(private.client)
        yield private
        if private.handle is not None:
            private.remove_all()
    finally:
        private.destroy()
        assert _ifindex("docker0") == docker0, "the shared engine's docker0 changed"
        assert engine.client.ping()


@pytest.fixture
def private_agent(agent_factory, private_engine):
    """Starts agents on the private engine with a short engine timeout; stops them after the test."""
    started = []

    def make():
        started.append(agent_factory(
            workers=2, DOCKER_HOST=private_engine.base_url, UTOPIA_AGENT_ENGINE_TIMEOUT=str(ENGINE_TIMEOUT),
        ))
        return started[-1]

    yield make
    for agent in started:
        agent.stop()



def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_outage_gives_503_and_the_agent_recovers_by_itself(private_engine, private_agent, claim, test_image):
    agent = private_agent()
    created = agent.create(claim("out"), test_image, gpu_count=2, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    before = agent.get(f"/api/v1/containers/{container_id}").json()
    assert len(before["gpu_ids"]) == 2

    private_engine.stop()
    limit = ENGINE_TIMEOUT + MARGIN
    time.sleep(HEALTH_TRUST)
    for _ in range(3):  # several times, so both workers answer
        health, took = timed(lambda: agent.get("/health", auth=False))
        assert health.status_code == 503 and health.json()["status"] == "unhealthy", health.text
        assert int(health.headers["Retry-After"]) > 0 and took < limit
        for method, path, body in [
            ("GET", "/api/v1/containers", None),
            ("GET", f"/api/v1/containers/{container_id}", None),
            ("DELETE", f"/api/v1/containers/{container_id}", None),
            ("POST", "/api/v1/containers", {"claim_id": claim("down"), "image": test_image}),
        ]:
            response, took = timed(lambda: agent.request(method, path, json=body))
            assert response.status_code == 503, (method, path, response.text)
            assert int(response.headers["Retry-After"]) > 0 and response.json()["message"]
            assert took < limit, (method, path, took)
        metrics = agent.get("/api/v1/metrics")
        assert metrics.status_code == 200 and len(metrics.json()["gpus"]) == 8

    private_engine.start()
    healthy = wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=limit + HEALTH_TRUST)
    assert healthy, agent.log()[-3000:]
    assert agent.process.poll() is None
    listed = [c for c in agent.get("/api/v1/containers").json() if c["claim_id"] == claim("out")]
    assert [(c["id"], c["gpu_ids"], c["status"]) for c in listed] == [(container_id, before["gpu_ids"], "exited")], "the engine's restart stopped it"
    assert agent.log().count("node view not trusted") == 1, "the outage is logged once, by the one watcher"
    assert wait_for(lambda: agent.log().count("node view live") == 2, timeout=limit), "the view came back by itself"
    assert agent.get("/api/v1/containers", params={"claim_id": claim("down")}).json() == []
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204


def test_an_agent_started_without_its_engine_becomes_healthy_when_it_appears(private_engine, private_agent, claim, test_image):
    private_engine.stop()
    agent = private_agent()
    assert agent.get("/health", auth=False).status_code == 503
    assert agent.get("/api/v1/containers").status_code == 503

    private_engine.start()
    limit = ENGINE_TIMEOUT + MARGIN
    for _ in range(4):  # each worker made its engine client while the engine was down
        assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=limit), agent.log()[-3000:]
    created = agent.create(claim("late"), test_image, gpu_count=1, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    assert [c["claim_id"] for c in agent.get("/api/v1/containers").json()] == [claim("late")]
    assert agent.delete(f"/api/v1/containers/{created.json()['container_id']}").status_code == 204


def test_a_hung_engine_gives_503_within_the_engine_timeout(private_engine, private_agent, test_image):
    """A frozen dockerd accepts connections and never answers: only the timeout ends a request."""
    agent = private_agent()
    assert agent.get("/api/v1/containers").status_code == 200
    dockerd = private_engine.handle.process
    os.kill(dockerd.pid, signal.SIGSTOP)
    try:
        time.sleep(HEALTH_TRUST)
        for method, path in [("GET", "/health"), ("GET", "/api/v1/containers"), ("GET", "/api/v1/containers/0123456789ab")]:
            response, took = timed(lambda: agent.request(method, path))
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, (path, response.text)
            assert ENGINE_TIMEOUT * 0.9 < took < ENGINE_TIMEOUT + MARGIN, (path, took)
        metrics, took = timed(lambda: agent.get("/api/v1/metrics"))
        assert metrics.status_code == 200 and len(metrics.json()["gpus"]) == 8
    finally:
        os.kill(dockerd.pid, signal.SIGCONT)
    assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=ENGINE_TIMEOUT + MARGIN)
    assert agent.get("/api/v1/containers").status_code == 200
