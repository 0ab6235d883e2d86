"""`utopia-agent` commands, run as an operator runs them: a separate process, against the real agent and engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import ROOT, TOKEN, AgentProcess
from tests.support.engine import free_host_port, free_port
from utopia_agent import cli


# Outside the checkout: run from it, the CLI would fill in what a developer's own `make run` left
# in .run/ (its token), which these tests must not depend on. Tests of that filling-in make a
# checkout of their own.
OUTSIDE_THE_CHECKOUT = Path(tempfile.gettempdir())


def run_cli(*args: str, env: dict[str, str], cwd=OUTSIDE_THE_CHECKOUT, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utopia_agent.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False, input=input,
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
        "UTOPIA_AGENT_BIND": f"127.0.0.1:{free_port()}",
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
    agent = AgentProcess(run_dir / "state", free_port(), {**plain, "UTOPIA_AGENT_GPU_BACKEND": "fake",
        "UTOPIA_AGENT_TOKEN_FILE": str(run_dir / "token")}, workers=1)
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


# --------------------------------------------------------------------------- through the API


def api_env(agent, **change: str | None) -> dict[str, str]:
    """The agent's own environment (its token and bind address), as an operator's shell on the node has it."""
    env = {**agent.env, **change}
    return {k: v for k, v in env.items() if v is not None}


def table_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[1:]]


@pytest.mark.usefixtures("nvidia_path")
def test_ps_show_and_rm_through_the_agent(agent, test_image, claim):
    port = free_host_port()
    created = agent.create(claim(), test_image, gpu_count=1, command=["sleep", "300"],
                           port_mappings=[{"host_port": port, "container_port": 8080}])
    assert created.status_code == 201, created.text
    container_id = created.json()["container_id"]
    env = api_env(agent)

    ps = run_cli("ps", "--claim", claim(), env=env)
    assert ps.returncode == 0, ps.stderr
    assert ps.stdout.splitlines()[0].split() == ["CONTAINER", "CLAIM", "IMAGE", "STATUS", "GPUS", "PORTS", "CREATED"]
    [row] = table_rows(ps.stdout)
    assert row[:4] == [container_id[:12], claim(), test_image, "running"] and row[5] == f"{port}->8080/tcp"
    [listed] = json.loads(run_cli("ps", "--claim", claim(), "--json", env=env).stdout)
    assert listed["id"] == container_id and len(listed["gpu_ids"]) == 1

    show = run_cli("show", container_id[:12], env=env)
    assert show.returncode == 0, show.stderr
    fields = dict(line.split(":", 1) for line in show.stdout.splitlines())
    assert fields["id"].strip() == container_id and fields["claim_id"].strip() == claim()
    assert json.loads(run_cli("show", container_id, "--json", env=env).stdout) == listed

    rm = run_cli("rm", container_id, env=env)
    assert (rm.returncode, rm.stdout.strip()) == (0, container_id)
    gone = run_cli("show", container_id, env=env)
    assert gone.returncode == 5
    assert stderr_lines(gone) == [f"utopia-agent: 404 not_found: {agent.get(f'/api/v1/containers/{container_id}').json()['message']}"]
    assert TOKEN not in ps.stdout + show.stdout + gone.stderr


def test_exit_codes_tell_failures_apart(agent, agent_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(agent.token + "\n")
    unreachable = run_cli("ps", "--url", f"http://127.0.0.1:{free_port()}", env=api_env(agent))
    assert unreachable.returncode == 3 and len(stderr_lines(unreachable)) == 1
    assert run_cli("ps", env=api_env(agent, UTOPIA_AGENT_TOKEN="wrong")).returncode == 4
    assert run_cli("ps", "--token-file", str(token_file), env=api_env(agent, UTOPIA_AGENT_TOKEN="wrong")).returncode == 0
    no_token = run_cli("ps", env=api_env(agent, UTOPIA_AGENT_TOKEN=None))
    assert no_token.returncode == 2 and "no token" in no_token.stderr
    assert run_cli("show", "0" * 12, env=api_env(agent)).returncode == 5
    assert run_cli("show", "--no-such-option", env=api_env(agent)).returncode == 2
    down = agent_factory(workers=1, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock", UTOPIA_AGENT_ENGINE_TIMEOUT="2")
    unavailable = run_cli("ps", env=api_env(down))
    assert unavailable.returncode == 7
    assert stderr_lines(unavailable)[0].startswith("utopia-agent: 503 engine_unavailable: ")


@pytest.mark.usefixtures("engine")  # the command then asks the engine itself which claims hold the GPUs
def test_gpus_reads_the_node_when_the_agent_does_not_answer(cli_env):
    result = run_cli("gpus", env={**cli_env, "UTOPIA_AGENT_BIND": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 0, result.stderr
    assert "the agent cannot list its GPUs" in result.stderr
    assert sorted(gpu_rows(result.stdout)) == list(range(8))


def test_gpus_shows_the_agents_states_and_quarantine(agent_factory):
    node = agent_factory(workers=1)
    env = api_env(node)
    uuid = DEFAULT_TEST_GPUS[0].uuid
    assert run_cli("quarantine", uuid, "--reason", "bad fan", env=env).returncode == 0
    result = run_cli("gpus", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["GPU", "UUID", "NAME", "STATE", "CLAIM", "REASON"]
    gpus = {gpu["uuid"]: gpu for gpu in json.loads(run_cli("gpus", "--json", env=env).stdout)}
    assert gpus[uuid]["state"] == "quarantined" and gpus[uuid]["reason"] == "bad fan"
    assert run_cli("release", uuid, env=env).returncode == 0
    assert json.loads(run_cli("gpus", "--json", env=env).stdout)[0]["state"] == "free"


def test_logs_prints_and_follows_the_output(agent, test_image, claim):
    created = agent.create(claim(), test_image, command=["sh", "-c", "echo one; sleep 2; echo two"])
    container_id = created.json()["container_id"]
    followed = run_cli("logs", "-f", container_id, env=api_env(agent))
    assert (followed.returncode, followed.stdout) == (0, "one\ntwo\n")
    last = run_cli("logs", "--tail", "1", container_id, env=api_env(agent))
    assert (last.returncode, last.stdout) == (0, "two\n")


def test_drain_and_resume(agent_factory, test_image, claim):
    node = agent_factory(workers=1)
    env = api_env(node)
    assert run_cli("drain", "--reason", "maintenance", env=env).returncode == 0
    assert node.get("/health", auth=False).json()["draining"] is True
    assert node.create(claim(), test_image).json()["error"] == "node_draining"
    assert run_cli("node", "--json", env=env).returncode == 0
    assert run_cli("resume", env=env).returncode == 0
    assert node.get("/health", auth=False).json().get("draining") is False
    recent = run_cli("events", env=env)
    assert recent.returncode == 0, recent.stderr
    assert [line.split()[2:4] for line in recent.stdout.splitlines()][-2:] == [["node", "drain"], ["node", "resume"]], recent.stdout
    assert "maintenance" in recent.stdout
    last = int(node.get("/api/v1/node").headers["X-Utopia-Revision"])
    after = run_cli("events", "--since", str(last - 1), "--json", env=env)
    assert [json.loads(line)["revision"] for line in after.stdout.splitlines()] == [last], after.stdout
    assert run_cli("events", "--since", str(last + 1), env=env).returncode == 1, "a future revision is refused (400)"
    started = time.monotonic()
    bounded = run_cli("events", "-f", "--timeout", "1", env=env)
    assert (bounded.returncode, bounded.stdout) == (0, "") and time.monotonic() - started < 10, bounded.stderr


def test_an_event_line_names_the_filesystems_short_of_space():
    change = {"revision": 7, "time": 0, "kind": "node", "action": "disk_pressure",
              "object": {"disk_pressure": True, "filesystems": [{"name": "data_root", "path": "/var/lib/docker", "free_percent": 4.2}]}}
    assert cli._event_line(change).split()[2:] == ["node", "disk_pressure", "data_root", "/var/lib/docker", "4.2%", "free"]
    ended = {**change, "action": "disk_pressure_ended", "object": {"disk_pressure": False, "filesystems": []}}
    assert cli._event_line(ended).split()[2:] == ["node", "disk_pressure_ended", "-"]
