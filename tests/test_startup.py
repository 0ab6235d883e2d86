"""Starting the agent: bad configuration stops it with one line; a missing engine does not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support.agent import ROOT, AgentProcess, make_run_is_installed
from tests.support.engine import free_port
from tests.support.polling import wait_for
from tests.support.prerequisites import require
from tests.support.scrape import sample, scrape
from utopia_agent.config import ephemeral_port_range, load_config
from utopia_agent.node.state_dir import METRICS_DIR, hold_state_dir, release_state_dir


def run_gunicorn(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    base.update({"UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"), "UTOPIA_AGENT_BIND": f"127.0.0.1:{free_port()}"})
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env={k: v for k, v in base.items() if v is not None}, capture_output=True, text=True, timeout=60,
    )


def test_a_host_port_range_in_the_kernels_ephemeral_range_stops_the_agent(tmp_path):
    """The real master's exit on a bad variable: code 2 and the error's one line (each variable's
    check runs in-process in tests/test_config.py)."""
    low, high = ephemeral_port_range()
    result = run_gunicorn({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_HOST_PORT_RANGE": f"{low - 10}-{low}"}, tmp_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"utopia-agent: configuration error: UTOPIA_AGENT_HOST_PORT_RANGE: {low - 10}-{low} overlaps the kernel's "
        f"ephemeral port range {low}-{high} (net.ipv4.ip_local_port_range), from which outgoing connections take "
        "their ports; choose a range outside it"
    ]


FILE_TOKEN = "file-token-abcdef0123456789"


@pytest.fixture(scope="module")
def engineless_agent(tmp_path_factory):
    """One agent with no engine behind its DOCKER_HOST and its token in a file, shared by the tests
    that only read from it; after it stops, its log still holds no token."""
    tmp = tmp_path_factory.mktemp("engineless")
    token_file = tmp / "token"
    token_file.write_text(FILE_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "UTOPIA_AGENT_TOKEN"}
    env.update({
        "DOCKER_HOST": f"unix://{tmp}/no-engine.sock",
        "UTOPIA_AGENT_GPU_BACKEND": "fake",
        "UTOPIA_AGENT_ENGINE_TIMEOUT": "2",
        "UTOPIA_AGENT_TOKEN_FILE": str(token_file),
    })
    agent = AgentProcess(tmp / "state", free_port(), env, workers=2)
    agent.env.pop("UTOPIA_AGENT_TOKEN")
    agent.token = FILE_TOKEN
    try:
        yield agent.start()
    finally:
        agent.stop()
    assert FILE_TOKEN not in agent.log(), "the token reached the log on the way out"


def test_the_token_can_come_from_a_file_and_never_reaches_the_log(engineless_agent):
    assert engineless_agent.get("/api/v1/metrics").status_code == 200
    assert engineless_agent.get("/api/v1/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    log = engineless_agent.log()
    assert "listening on http://127.0.0.1" in log and f"the token in {engineless_agent.env['UTOPIA_AGENT_TOKEN_FILE']}" in log
    assert FILE_TOKEN not in log


def test_nvml_backend_without_nvml_stops_the_agent(tmp_path):
    result = run_gunicorn({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_GPU_BACKEND": "nvml", "LD_LIBRARY_PATH": str(tmp_path)}, tmp_path)
    assert result.returncode != 0
    assert "cannot start: NVML did not load" in result.stderr


def test_without_an_engine_the_agent_starts_and_says_503(engineless_agent):
    agent = engineless_agent
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


def start_beside(agent: AgentProcess, port: int) -> subprocess.CompletedProcess:
    """Start a second gunicorn with `agent`'s environment on another port; stop it if it stays up."""
    env = {**agent.env, "UTOPIA_AGENT_BIND": f"127.0.0.1:{port}"}
    second = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = second.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)
        stdout, stderr = second.communicate()
        pytest.fail(f"a second agent ran on the state dir of the first:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(second.args, second.returncode, stdout, stderr)


def metrics_requests_counted(agent: AgentProcess) -> float:
    return sample(scrape(agent), "utopia_agent_http_request_duration_seconds_count", route="/api/v1/metrics", method="GET", status="200")


def test_a_second_agent_on_the_same_state_dir_stops_and_leaves_the_first_alone(tmp_path):
    env = dict(os.environ, UTOPIA_AGENT_GPU_BACKEND="none")
    first = AgentProcess(tmp_path / "state", free_port(), env, workers=1)
    in_use = (
        f"utopia-agent: state dir {first.state_dir} is in use by the agent with pid {{pid}} on 127.0.0.1:{first.port}; "
        "stop it first, or give this one its own UTOPIA_AGENT_STATE_DIR"
    )
    try:
        first.start()
        for _ in range(5):
            assert first.get("/api/v1/metrics").status_code == 200
        counted = metrics_requests_counted(first)
        assert counted >= 5

        second = start_beside(first, free_port())
        assert second.returncode == 2, second.stderr
        assert [line for line in second.stderr.splitlines() if line.strip()] == [in_use.format(pid=first.process.pid)]
        assert metrics_requests_counted(first) >= counted, "the second start emptied the first one's metrics"

        # gunicorn runs its config file again on HUP, in the same master, before it starts new workers
        # (the old ones go on their own): it keeps the state dir and its counters.
        workers = set(first.worker_pids())
        first.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: set(first.worker_pids()) - workers, timeout=60), "no new worker after HUP"
        assert metrics_requests_counted(first) >= counted
        assert start_beside(first, free_port()).returncode == 2
    finally:
        assert first.stop() == 0
    assert (first.state_dir / "agent.lock").read_text() == "", "a clean stop clears the record of the running agent"
    # The next agent's master takes the state dir as this one's did (a real refusal is proven above).
    after = load_config(first.env)
    assert hold_state_dir(after), "a clean stop lets the state dir go"
    release_state_dir(after)


def test_make_run_says_listening_only_once_the_configuration_passed(tmp_path):
    require(shutil.which("make") is not None and make_run_is_installed(), "make and an installed .venv (make test makes it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    env.update({
        "UTOPIA_AGENT_TOKEN": "t",
        "UTOPIA_AGENT_WORKERS": "many",
        "UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"),
        "UTOPIA_AGENT_BIND": f"127.0.0.1:{free_port()}",
    })
    run_dir_existed = (ROOT / ".run").exists()
    try:
        result = subprocess.run(["make", "--no-print-directory", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        if not run_dir_existed:
            shutil.rmtree(ROOT / ".run", ignore_errors=True)
    assert result.returncode != 0
    assert "listening" not in result.stdout + result.stderr
    assert "utopia-agent: configuration error: UTOPIA_AGENT_WORKERS" in result.stderr


def every_worker_answered(agent: AgentProcess, workers: int) -> bool:
    """Ask once more, then say whether each worker has answered a request, and so built its app,
    GPU inventory included: prometheus-client makes a worker's histogram file at its first request."""
    agent.get("/openapi.json", auth=False, headers={"Connection": "close"})
    pids = agent.worker_pids()
    return len(pids) == workers and all((agent.state_dir / METRICS_DIR / f"histogram_{pid}.db").exists() for pid in pids)


def test_auto_without_nvml_says_so_once_per_agent(tmp_path):
    """Every worker falls back to no GPUs, a respawned one too, but the operator reads it once."""
    env = dict(os.environ, UTOPIA_AGENT_GPU_BACKEND="auto", LD_LIBRARY_PATH=str(tmp_path))
    env.pop("FAKE_NVML_CONFIG", None)
    agent = AgentProcess(tmp_path / "state", free_port(), env, workers=2)
    try:
        agent.start()
        assert wait_for(lambda: every_worker_answered(agent, 2), timeout=60, interval=0.05)
        killed = agent.worker_pids()[0]
        os.kill(killed, signal.SIGKILL)
        assert wait_for(lambda: killed not in agent.worker_pids() and every_worker_answered(agent, 2), timeout=60, interval=0.05)
        assert agent.get("/api/v1/metrics").json()["gpus"] == []
    finally:
        agent.stop()
    assert agent.log().count("GPU backend auto:") == 1, agent.log()[-3000:]
