"""`utopia-agent check | gpus | serve`, run as an operator runs them: a separate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import ROOT, TOKEN, AgentProcess
from tests.support.engine import free_port
from utopia_agent import cli


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
def test_check_names_the_bad_variable_in_one_line(cli_env, change, variable, tmp_path):
    env = {**cli_env, **change}
    # Outside the checkout, where a `make run` may have left a token file for the CLI to find.
    result = run_cli("check", env={k: v for k, v in env.items() if v is not None}, cwd=tmp_path)
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


@pytest.fixture
def make_run_checkout(tmp_path):
    """A checkout where `make run` ran: its Makefile and gunicorn.conf.py, `.run/token` and `.run/state`."""
    checkout = tmp_path / "checkout"
    (checkout / ".run" / "state").mkdir(parents=True)
    for name in ("Makefile", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, checkout / name)
    (checkout / ".run" / "token").write_text("made-by-make-run-0123456789\n")
    return checkout


def test_check_and_gpus_from_a_make_run_checkout_describe_the_running_agent(make_run_checkout, engine):
    """As `UTOPIA_AGENT_GPU_BACKEND=fake make run` starts it; the CLI's shell sets no UTOPIA_AGENT_* at all
    (but the state dir as root, where `make run` uses the default /var/lib/utopia-agent, as the CLI does)."""
    run_dir = make_run_checkout / ".run"
    plain = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    agent = AgentProcess(run_dir / "state", free_port(), {**plain, "UTOPIA_AGENT_GPU_BACKEND": "fake", "UTOPIA_AGENT_TOKEN_FILE": str(run_dir / "token")}, workers=1)
    agent.env.pop("UTOPIA_AGENT_TOKEN")
    agent.token = "made-by-make-run-0123456789"
    cli_env = dict(plain, UTOPIA_AGENT_STATE_DIR=str(run_dir / "state")) if os.geteuid() == 0 else plain
    try:
        agent.start()
        assert len(agent.get("/api/v1/metrics").json()["gpus"]) == 8

        check = run_cli("check", env=cli_env, cwd=make_run_checkout)
        assert check.returncode == 0, check.stderr
        assert f"token file {run_dir / 'token'}" in check.stderr
        assert f"agent: running, pid {agent.process.pid} on 127.0.0.1:{agent.port} (GPU backend fake)" in check.stdout
        assert "gpus: 8 found (backend fake)" in check.stdout
        assert "made-by-make-run" not in check.stdout + check.stderr

        gpus = run_cli("gpus", env=cli_env, cwd=make_run_checkout)
        assert gpus.returncode == 0, gpus.stderr
        assert "gpus: 8 found (backend fake)" in gpus.stdout and sorted(gpu_rows(gpus.stdout)) == list(range(8))

        told = run_cli("gpus", env={**cli_env, "UTOPIA_AGENT_GPU_BACKEND": "none"}, cwd=make_run_checkout)
        assert "gpus: 0 found (backend none)" in told.stdout, "the environment still has the last word"
    finally:
        agent.stop()
    stopped = run_cli("check", env=cli_env, cwd=make_run_checkout)
    assert "agent: none running on this state dir" in stopped.stdout


def test_make_run_defaults_are_used_only_where_nothing_else_says(make_run_checkout, monkeypatch):
    """As a non-root user (whose `make run` keeps its state in .run/state); as root only the token file."""
    run_dir = make_run_checkout / ".run"
    monkeypatch.chdir(make_run_checkout)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    env, notes = cli.with_make_run_defaults({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "UTOPIA_AGENT_TOKEN_FILE": str(run_dir / "token"), "UTOPIA_AGENT_STATE_DIR": str(run_dir / "state")}
    assert len(notes) == 2
    told = {"UTOPIA_AGENT_TOKEN": "mine", "UTOPIA_AGENT_STATE_DIR": "/srv/agent"}
    assert cli.with_make_run_defaults(told) == (told, [])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "UTOPIA_AGENT_STATE_DIR" not in cli.with_make_run_defaults({})[0]
    monkeypatch.chdir(make_run_checkout.parent)
    assert cli.with_make_run_defaults({}) == ({}, []), "outside a checkout nothing is filled in"
