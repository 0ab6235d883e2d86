"""The shipped supervisord program section, run by the real supervisord.

The section under test is deploy/supervisord-utopia-agent.conf with only its paths changed
(by text substitution, so a broken shipped file breaks these tests); supervisord itself gets
a minimal config of its own in a temp dir, with its own socket for supervisorctl.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.fake_nvml import DEFAULT_TEST_GPUS, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import ROOT, TOKEN, AgentProcess
from tests.support.engine import Registry, SlowRegistry, free_port, make_unique_image, remove_images
from tests.support.polling import wait_for
from tests.support.prerequisites import require

SHIPPED = ROOT / "deploy" / "supervisord-utopia-agent.conf"
PROGRAM = "utopia-agent"
LABELS = ("utopia.managed", "utopia.claim_id", "utopia.gpu_ids", "utopia.gpu_uuids")

SUPERVISORD_CONF = """\
[unix_http_server]
file={dir}/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{dir}/supervisor.sock

"""


def adapt_program_section(shipped: str, paths: dict[str, tuple[str, str]], env: dict[str, str]) -> str:
    """The shipped section with `old` replaced by `new` in each named setting, and `env` appended.

    Each setting must exist and hold its `old` text, so a changed shipped file fails loudly
    instead of silently testing something else.
    """
    lines, seen = [], set()
    for line in shipped.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in paths:
            old, new = paths[key]
            assert old in value, f"{SHIPPED.name}: {key}= no longer holds {old!r}"
            value = value.replace(old, new)
            seen.add(key)
        if sep and key == "environment":
            value += "".join(f',{name}="{text}"' for name, text in env.items())
            seen.add(key)
        lines.append(f"{key}{sep}{value}" if sep else line)
    assert seen == {*paths, "environment"}, f"{SHIPPED.name} lacks {sorted({*paths, 'environment'} - seen)}"
    return "\n".join(lines) + "\n"


def alive(pid: int) -> bool:
    """Running (a zombie left for init to reap holds no port and runs no code)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False



class Supervisor:
    """supervisord in the foreground with the adapted agent section; `stop` ends all it started."""

    def __init__(self, directory: Path, fake_nvml_dir: Path, workers: int = 2):
        self.dir = directory
        state_dir = directory / "state"
        (state_dir / "volumes").mkdir(parents=True)
        token_file = directory / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        (directory / "read-token").write_text("prometheus-reads-only\n")
        nvml_config = write_fake_nvml_config(directory / "nvml.conf", DEFAULT_TEST_GPUS)
        nvml_env = fake_nvml_env(fake_nvml_dir, nvml_config, {})
        self.port = free_port()
        env = {
            "UTOPIA_AGENT_BIND": f"127.0.0.1:{self.port}",
            "UTOPIA_AGENT_WORKERS": str(workers),
            "UTOPIA_AGENT_GPU_BACKEND": "nvml",
            "UTOPIA_AGENT_STOP_TIMEOUT": "1",
            "UTOPIA_AGENT_HOST_PORT_RANGE": "20000-29999",
            "UTOPIA_AGENT_RESTART_POLICY": "no",
            "LD_LIBRARY_PATH": nvml_env["LD_LIBRARY_PATH"],
            "FAKE_NVML_CONFIG": nvml_env["FAKE_NVML_CONFIG"],
        }
        self.log_path = state_dir / "agent.log"
        section = adapt_program_section(
            SHIPPED.read_text(),
            {
                # The gunicorn of the virtualenv running the tests (this repo's .venv in CI).
                "command": ("/opt/utopia-agent/.venv/bin/gunicorn", str(Path(sys.executable).parent / "gunicorn")),
                "directory": ("/opt/utopia-agent", str(ROOT)),
                "environment": ("/etc/utopia-agent/", f"{directory}/"),  # the token and the read-only token
                "stdout_logfile": ("/var/log/utopia-agent.log", str(self.log_path)),
            },
            env,
        )
        assert "/var/lib/utopia-agent" in section
        section = section.replace('"/var/lib/utopia-agent"', f'"{state_dir}"')
        self.conf = directory / "supervisord.conf"
        self.conf.write_text(SUPERVISORD_CONF.format(dir=directory) + section)
        # The HTTP side of the agent, as an orchestrator sees it (AgentProcess is never started).
        self.agent = AgentProcess(state_dir, self.port, {"UTOPIA_AGENT_TOKEN": TOKEN})
        self.process: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    def start(self) -> Supervisor:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
        with open(self.dir / "supervisord.out", "ab") as out:
            self.process = subprocess.Popen(
                ["supervisord", "-c", str(self.conf)], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.wait_serving()
        return self

    def ctl(self, *args: str) -> str:
        result = subprocess.run(["supervisorctl", "-c", str(self.conf), *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    def master_pid(self) -> int:
        """The gunicorn master's pid, as supervisord knows it (0 while it is not running)."""
        pid = self.ctl("pid", PROGRAM)
        return int(pid) if pid.isdigit() else 0

    def workers(self, master: int) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(master).children()]
        except psutil.NoSuchProcess:
            return []

    def remember(self) -> tuple[int, list[int]]:
        """The master and its workers now; `stop` makes sure every remembered one is gone."""
        master = self.master_pid()
        workers = self.workers(master) if master else []
        self.seen_pids.update([master, *workers] if master else [])
        return master, workers

    def wait_serving(self, other_than: int = 0, timeout: float = 60) -> int:
        """Wait until a master other than `other_than` is RUNNING with both workers answering."""
        def ready():
            master = self.master_pid()
            if not master or master == other_than or "RUNNING" not in self.ctl("status", PROGRAM):
                return 0
            try:
                ok = self.agent.get("/health", auth=False, timeout=2).status_code == 200
            except requests.RequestException:
                return 0
            return master if ok and len(self.workers(master)) == 2 else 0

        master = wait_for(ready, timeout, 0.3)
        assert master, f"the agent did not come up under supervisord:\n{self.agent.log()[-3000:]}\n{self.ctl('status')}"
        self.remember()
        return master

    def listeners(self) -> set[int]:
        """Pids holding a listening socket on the agent's port."""
        return {
            conn.pid for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == self.port
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.remember()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        leftovers = [pid for pid in self.seen_pids if alive(pid)]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.agent.client.close()
        assert not leftovers, f"supervisord left agent processes behind: {leftovers}"


@pytest.fixture
def supervisor(tmp_path, fake_nvml_dir, engine, test_image):
    require(shutil.which("supervisord") is not None, "supervisord is not installed (apt-get install supervisor)")
    require(os.geteuid() == 0, "the shipped section runs the agent as user=root")
    sup = Supervisor(tmp_path, fake_nvml_dir)
    try:
        yield sup.start()
    finally:
        sup.stop()


def gone(pids) -> bool:
    return not any(alive(pid) for pid in pids)


@pytest.mark.usefixtures("nvidia_path")
def test_supervisord_brings_a_killed_master_back_with_every_claim(supervisor, docker_client, test_image, claim):
    agent = supervisor.agent
    created = agent.create(claim("kill"), test_image, gpu_count=2, command=["sleep", "600"])
    assert created.status_code == 201, created.text
    before = agent.get(f"/api/v1/containers/{created.json()['container_id']}").json()
    old_master, old_workers = supervisor.remember()
    assert len(old_workers) == 2 and supervisor.listeners() <= {old_master, *old_workers}

    os.kill(old_master, signal.SIGKILL)
    new_master = supervisor.wait_serving(other_than=old_master)

    assert wait_for(lambda: gone(old_workers), 30), f"old workers {old_workers} outlived their master"
    new_workers = supervisor.workers(new_master)
    assert supervisor.listeners() <= {new_master, *new_workers}
    listed = agent.get("/api/v1/containers", params={"claim_id": claim("kill")}).json()
    assert [(c["id"], c["gpu_ids"]) for c in listed] == [(before["id"], before["gpu_ids"])]
    assert docker_client.containers.get(before["id"]).status == "running"


@pytest.fixture
def slow_image(docker_client):
    """An image that only a throttled loopback registry has, so a create spends seconds pulling it."""
    with Registry() as registry, SlowRegistry(registry, kib_per_s=256) as slow:
        source = make_unique_image(docker_client, f"utopia-test/slow-{os.getpid()}:1")
        pushed = registry.push(docker_client, source, f"t/slow-{os.getpid()}:1")
        remove_images(docker_client, [source])
        ref = slow.ref(pushed.split("/", 1)[1])
        try:
            yield ref
        finally:
            remove_images(docker_client, [ref])


@pytest.mark.usefixtures("nvidia_path")
def test_sigterm_lets_in_flight_creates_finish(supervisor, docker_client, slow_image, claim):
    agent = supervisor.agent
    claims = [claim(str(i)) for i in range(3)]
    responses: dict[str, requests.Response | Exception] = {}
    finished: dict[str, float] = {}

    def create(claim_id: str) -> None:
        body = {"claim_id": claim_id, "image": slow_image, "gpu_count": 2, "command": ["sleep", "600"]}
        try:
            with agent.new_client() as client:
                responses[claim_id] = client.send("POST", "/api/v1/containers", json=body, timeout=120)
        except requests.RequestException as exc:
            responses[claim_id] = exc
        finished[claim_id] = time.monotonic()

    master, _ = supervisor.remember()
    threads = [threading.Thread(target=create, args=(c,)) for c in claims]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: agent.log().count("image pull started") >= len(claims), 20), agent.log()[-3000:]
    sigterm_at = time.monotonic()
    os.kill(master, signal.SIGTERM)
    for thread in threads:
        thread.join(120)

    assert any(at > sigterm_at + 0.5 for at in finished.values()), "no create was still in flight at SIGTERM"
    made = {}
    for claim_id, response in responses.items():
        assert isinstance(response, requests.Response), f"{claim_id}: {response!r}"
        if response.status_code == 201:
            made[claim_id] = response.json()["container_id"]
        else:
            assert response.json()["error"] and response.json()["message"], response.text

    containers = docker_client.containers.list(all=True, filters={"label": "utopia.claim_id"})
    ours = [c for c in containers if c.labels["utopia.claim_id"] in claims]
    assert {c.labels["utopia.claim_id"]: c.id for c in ours} == made
    held: list[str] = []
    for container in ours:
        labels = container.labels
        assert set(LABELS) <= set(labels) and labels["utopia.managed"] == "true", labels
        assert len(labels["utopia.gpu_ids"].split(",")) == len(labels["utopia.gpu_uuids"].split(",")) == 2, labels
        held += labels["utopia.gpu_ids"].split(",")
    assert len(held) == len(set(held)), f"a GPU is in two containers: {sorted(held)}"

    supervisor.wait_serving(other_than=master)
    listed = agent.get("/api/v1/containers").json()
    assert {c["claim_id"]: c["id"] for c in listed if c["claim_id"] in claims} == made
