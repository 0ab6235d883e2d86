"""`utopia-agent check | gpus | serve`, run as an operator runs them: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import ROOT, TOKEN, AgentProcess
from tests.support.engine import free_port


def run_cli(*args: str, env: dict[str, str], cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utopia_agent.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli_env(tmp_path, fake_nvml_dir) -> dict[str, str]:
    """The agent's environment on a node with the 8 stand-in GPUs and the real engine."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    base.update({
        "UTOPIA_AGENT_TOKEN": TOKEN,
        "UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"),
        "UTOPIA_AGENT_GPU_BACKEND": "nvml",
    })
    nvml_config = write_fake_nvml_config(tmp_path / "nvml.conf", DEFAULT_TEST_GPUS)
    return fake_nvml_env(fake_nvml_dir, nvml_config, base)


def gpu_rows(stdout: str) -> dict[int, list[str]]:
    """The GPU table's rows by index (a row starts with the index, the header with 'GPU')."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_check_passes_against_the_real_engine_and_lists_the_gpus(cli_env, docker_client):
    result = run_cli("check", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "config: ok" in result.stdout
    assert f"Docker {docker_client.version()['Version']}" in result.stdout
    assert "gpus: 8 found (backend nvml), 1 failed" in result.stdout
    rows = gpu_rows(result.stdout)
    assert sorted(rows) == list(range(8))
    assert rows[0][1] == DEFAULT_TEST_GPUS[0].uuid
    assert rows[6][-1] == "FAILED" and rows[3][-1] == "healthy"
    assert TOKEN not in result.stdout + result.stderr
    assert os.path.isdir(cli_env["UTOPIA_AGENT_STATE_DIR"])


@pytest.mark.parametrize(
    "change,variable",
    [
        ({"UTOPIA_AGENT_TOKEN": None}, "UTOPIA_AGENT_TOKEN"),
        ({"UTOPIA_AGENT_HOST_PORT_RANGE": "40000-30000"}, "UTOPIA_AGENT_HOST_PORT_RANGE"),
        ({"UTOPIA_AGENT_STATE_DIR": "/proc/utopia"}, "UTOPIA_AGENT_STATE_DIR"),
    ],
)
def test_check_names_the_bad_variable_in_one_line(cli_env, change, variable):
    env = {**cli_env, **change}
    result = run_cli("check", env={k: v for k, v in env.items() if v is not None})
    assert result.returncode == 2
    assert stderr_lines(result) == [stderr_lines(result)[0]]
    assert stderr_lines(result)[0].startswith(f"utopia-agent: configuration error: {variable}: ")
    assert "config: ok" not in result.stdout


def test_check_says_the_engine_is_unreachable(cli_env, tmp_path):
    result = run_cli("check", env={**cli_env, "DOCKER_HOST": f"unix://{tmp_path}/missing.sock"})
    assert result.returncode == 1
    assert stderr_lines(result) == [f"utopia-agent: the Docker engine is unreachable (ping) at unix://{tmp_path}/missing.sock"]
    assert "config: ok" in result.stdout and "engine: ok" not in result.stdout


def test_check_fails_when_the_nvml_backend_has_no_library(cli_env, tmp_path, engine):
    env = {k: v for k, v in cli_env.items() if k != "FAKE_NVML_CONFIG"}
    env["LD_LIBRARY_PATH"] = str(tmp_path)
    result = run_cli("check", env=env)
    assert result.returncode == 1
    assert stderr_lines(result) == ["utopia-agent: GPU backend nvml: NVML did not load: NVML Shared Library Not Found"]
    assert "engine: ok" in result.stdout and "gpus:" not in result.stdout


def test_gpus_shows_the_claim_holding_each_gpu(agent, test_image, claim, nvidia_path):
    created = agent.create(claim("gpus"), test_image, gpu_count=2, command=["sleep", "300"])
    assert created.status_code == 201, created.text
    held = agent.get(f"/api/v1/containers/{created.json()['container_id']}").json()["gpu_ids"]
    assert len(held) == 2

    env = {k: v for k, v in agent.env.items() if k != "UTOPIA_AGENT_TOKEN"}
    result = run_cli("gpus", env=env)
    assert result.returncode == 0, result.stderr
    rows = gpu_rows(result.stdout)
    assert sorted(rows) == list(range(8))
    for index, cells in rows.items():
        claims = cells[-1].split(",")
        assert (claim("gpus") in claims) == (index in held), result.stdout
    assert rows[6][-2:] == ["FAILED", "-"]
    assert TOKEN not in result.stdout + result.stderr


def test_gpus_still_lists_the_gpus_while_the_engine_is_down(cli_env, tmp_path):
    result = run_cli("gpus", env={**cli_env, "DOCKER_HOST": f"unix://{tmp_path}/missing.sock"})
    assert result.returncode == 1
    assert "engine is unreachable" in result.stderr and "claims unknown" in result.stderr
    rows = gpu_rows(result.stdout)
    assert sorted(rows) == list(range(8)) and {cells[-1] for cells in rows.values()} == {"?"}


def test_serve_execs_gunicorn_with_the_shipped_config(cli_env, tmp_path, engine):
    """From another directory, the master is the CLI's own process (exec) and serves the agent."""
    agent = AgentProcess(tmp_path / "state", free_port(), cli_env, workers=1)
    agent.state_dir.mkdir()
    with open(agent.log_path, "ab") as log:
        agent.process = subprocess.Popen(
            [sys.executable, "-m", "utopia_agent.cli", "serve"],
            cwd=tmp_path, env=agent.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        agent.wait_until_serving()
        assert agent.get("/health", auth=False).status_code == 200
        assert len(agent.get("/api/v1/metrics").json()["gpus"]) == 8
        assert len(agent.worker_pids()) == 1
        with open(f"/proc/{agent.process.pid}/cmdline", "rb") as cmdline:
            assert b"gunicorn" in cmdline.read()
    finally:
        assert agent.stop() == 0
    assert "listening on http://127.0.0.1" in agent.log()
