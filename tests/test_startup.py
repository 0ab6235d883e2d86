"""Starting the agent: bad configuration stops it with one line; a missing engine does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.agent import ROOT, AgentProcess
from tests.support.engine import free_port


def run_gunicorn(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    base.update({"UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"), "UTOPIA_AGENT_BIND": f"127.0.0.1:{free_port()}"})
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env={k: v for k, v in base.items() if v is not None}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "env,variable",
    [
        ({}, "UTOPIA_AGENT_TOKEN"),
        ({"UTOPIA_AGENT_TOKEN_FILE": "/nonexistent/token"}, "UTOPIA_AGENT_TOKEN_FILE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_HOST_PORT_RANGE": "40000-30000"}, "UTOPIA_AGENT_HOST_PORT_RANGE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_HOST_PORT_RANGE": "lots"}, "UTOPIA_AGENT_HOST_PORT_RANGE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_GPU_BACKEND": "cuda"}, "UTOPIA_AGENT_GPU_BACKEND"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_WORKERS": "many"}, "UTOPIA_AGENT_WORKERS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": "/proc/utopia"}, "UTOPIA_AGENT_STATE_DIR"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_PULL_IDLE_TIMEOUT": "0"}, "UTOPIA_AGENT_PULL_IDLE_TIMEOUT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_VOLUME_ROOTS": "/"}, "UTOPIA_AGENT_VOLUME_ROOTS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_CPUS": str(len(os.sched_getaffinity(0)))}, "UTOPIA_AGENT_RESERVED_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_CPUS": "-1"}, "UTOPIA_AGENT_RESERVED_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_MEMORY_MB": "1e12"}, "UTOPIA_AGENT_RESERVED_MEMORY_MB"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_CPU_PINNING": "always"}, "UTOPIA_AGENT_CPU_PINNING"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_DEFAULT_SHM_MB": "0"}, "UTOPIA_AGENT_DEFAULT_SHM_MB"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_LOG_FOLLOW_SECONDS": "forever"}, "UTOPIA_AGENT_LOG_FOLLOW_SECONDS"),
    ],
)
def test_bad_configuration_stops_the_agent_with_one_line(env, variable, tmp_path):
    result = run_gunicorn(env, tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("utopia-agent: configuration error: " + variable)


def test_the_token_can_come_from_a_file_and_never_reaches_the_log(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-abcdef0123456789\n")
    env = {k: v for k, v in os.environ.items() if k != "UTOPIA_AGENT_TOKEN"}
    env.update({"UTOPIA_AGENT_TOKEN_FILE": str(token_file), "UTOPIA_AGENT_GPU_BACKEND": "none"})
    agent = AgentProcess(tmp_path / "state", free_port(), env, workers=1)
    agent.env.pop("UTOPIA_AGENT_TOKEN")
    agent.token = "file-token-abcdef0123456789"
    try:
        agent.start()
        assert agent.get("/api/v1/metrics").status_code == 200
        assert agent.get("/api/v1/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        agent.stop()
    assert "file-token-abcdef0123456789" not in agent.log()
    assert "listening on http://127.0.0.1" in agent.log()


def test_nvml_backend_without_nvml_stops_the_agent(tmp_path):
    result = run_gunicorn({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_GPU_BACKEND": "nvml", "LD_LIBRARY_PATH": str(tmp_path)}, tmp_path)
    assert result.returncode != 0
    assert "cannot start: NVML did not load" in result.stderr


def test_without_an_engine_the_agent_starts_and_says_503(tmp_path):
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock", UTOPIA_AGENT_GPU_BACKEND="fake", UTOPIA_AGENT_ENGINE_TIMEOUT="2")
    agent = AgentProcess(tmp_path / "state", free_port(), env, workers=2)
    try:
        agent.start()
        health = agent.get("/health", auth=False)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "Retry-After" in health.headers and health.json()["reason"]
        for method, path in [("GET", "/api/v1/containers"), ("GET", "/api/v1/containers/0123456789ab"), ("DELETE", "/api/v1/containers/0123456789ab")]:
            response = agent.request(method, path)
            assert response.status_code == 503, (method, path, response.text)
            assert int(response.headers["Retry-After"]) > 0 and response.json()["message"]
        created = agent.create("c-engine-down", "utopia-test/busybox:latest")
        assert created.status_code == 503
        metrics = agent.get("/api/v1/metrics")
        assert metrics.status_code == 200 and len(metrics.json()["gpus"]) == 8
    finally:
        agent.stop()
