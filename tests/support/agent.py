"""The real agent under gunicorn, as production runs it, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import docker
import requests

from tests.support.engine import claims_subnet_for_a_test
from tests.support.polling import wait_for
from utopia_agent.client import AgentClient
from utopia_agent.engine.networks import STATE_DIR_LABEL
from utopia_agent.network.firewall import Firewall, FirewallError
from utopia_agent.network.isolation import IsolationPlan

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"


def unmount_under(path: Path) -> None:
    """Unmount every mount point at or below `path`, deepest first: volume pins outlive the agent
    that made them, as its claims' containers do, so tests take them away themselves."""
    top = str(path)
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p == top or p.startswith(top + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def make_run_is_installed() -> bool:
    """True when `make run` would start the agent at once, with no pip install first."""
    dry_run = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    return dry_run.returncode == 0 and "pip install" not in dry_run.stdout


class AgentProcess:
    """`gunicorn -c gunicorn.conf.py wsgi:app` on a loopback port, with its log in a file.

    `app` serves another WSGI app under the same config (the benchmark's bare floor).
    """

    def __init__(self, state_dir: Path, port: int, env: dict[str, str], workers: int = 2, app: str = "wsgi:app",
                 ca_file: Path | None = None, client_cert: tuple[Path, Path] | None = None):
        """On HTTPS (UTOPIA_AGENT_TLS_CERT_FILE in `env`) its clients trust `ca_file` and present `client_cert`."""
        self.app = app
        # The gunicorn config it starts with: the agent's, unless a test wraps it (tests/support/*.conf.py).
        self.config = "gunicorn.conf.py"
        self.state_dir = state_dir
        self.port = port
        self.ca_file = ca_file
        self.client_cert = client_cert
        scheme = "https" if env.get("UTOPIA_AGENT_TLS_CERT_FILE") else "http"
        self.base_url = f"{scheme}://127.0.0.1:{port}"
        self.log_path = state_dir / "agent.log"
        self.env = {
            # A subnet of the test run's own, unless the test asks for the engine's pick ("").
            "UTOPIA_AGENT_NETWORK_SUBNET": claims_subnet_for_a_test(),
            **env,
            "UTOPIA_AGENT_TOKEN": env.get("UTOPIA_AGENT_TOKEN", TOKEN),
            "UTOPIA_AGENT_BIND": f"127.0.0.1:{port}",
            "UTOPIA_AGENT_WORKERS": str(workers),
            "UTOPIA_AGENT_STATE_DIR": str(state_dir),
        }
        self.process: subprocess.Popen | None = None
        self._stopping = False  # told to stop, maybe not gone yet
        self.token = self.env["UTOPIA_AGENT_TOKEN"]

    @property
    def token(self) -> str:
        return self._token

    @token.setter
    def token(self, token: str) -> None:
        """The token the tests send; `client` (the one `request` uses) follows it."""
        self._token = token
        self.client = self.new_client()

    def new_client(self, **options) -> AgentClient:
        """A client of this agent on a session (and so a keep-alive connection) of its own."""
        options.setdefault("timeout", 60)
        options.setdefault("ca_file", self.ca_file)
        options.setdefault("client_cert", self.client_cert)
        return AgentClient(self.base_url, token=self.token, **options)

    def start(self, wait: bool = True, ready_path: str = "/openapi.json") -> AgentProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", self.config, self.app],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait:
            self.wait_until_serving(ready_path=ready_path)
        return self

    def wait_until_serving(self, timeout: float = 30, ready_path: str = "/openapi.json") -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                self.client.send("GET", ready_path, auth=False, timeout=5)
                return True
            except (requests.ConnectionError, requests.Timeout):
                return False  # refused before the master binds; unanswered while the workers still load the app

        if not wait_for(serving, timeout, interval=0.1):
            raise RuntimeError(f"agent did not serve within {timeout}s:\n{self.log()[-3000:]}")

    def signal_stop(self, sig: int = signal.SIGTERM) -> None:
        """Tell the master to stop, without waiting (stop() waits)."""
        if self.process is not None and self.process.poll() is None and not self._stopping:
            self.process.send_signal(sig)
            self._stopping = True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Stop the master and wait for it and its workers (the whole process group)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        if not self._stopping:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.client.close()
        unmount_under(self.state_dir / "mounts")
        return self.process.returncode

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, auth: bool = True, **kwargs) -> requests.Response:
        """The raw answer, as tests of malformed or refused requests need it (the client's `send`)."""
        return self.client.send(method, path, auth=auth, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def create(self, claim_id: str, image: str, **fields) -> requests.Response:
        return self.post("/api/v1/containers", json={"claim_id": claim_id, "image": image, **fields})

    def sessions(self, count: int = 8) -> list[requests.Session]:
        """Keep-alive sessions, each warmed with a list: enough of them reach every worker."""
        sessions = []
        for _ in range(count):
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
            session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides `verify`
            session.verify = str(self.ca_file) if self.ca_file else True
            session.cert = tuple(map(str, self.client_cert)) if self.client_cert else None
            assert session.get(self.base_url + "/api/v1/containers", timeout=60).status_code == 200
            sessions.append(session)
        return sessions


def remove_agent_networks(client, under: Path) -> None:
    """Remove the claims networks and firewall rules of the agents whose state dir lies under
    `under` (this run's): an agent killed, or stopped with claims on its network or with its
    iptables failing on cue, leaves them. One that goes meanwhile (its agent's own stop) is fine.
    Without an engine (`client` None: `make check` as root) the rules still go: they need none."""
    state_dirs = {path.parent for path in under.rglob("agent.lock")}
    for network in client.networks.list(filters={"label": STATE_DIR_LABEL}) if client is not None else ():
        state_dir = network.attrs.get("Labels", {}).get(STATE_DIR_LABEL, "")
        if not state_dir.startswith(str(under) + "/"):
            continue
        state_dirs.add(Path(state_dir))
        try:
            network.reload()
            for container_id in network.attrs.get("Containers") or {}:
                network.disconnect(container_id, force=True)
            network.remove()
        except docker.errors.APIError as error:
            print(f"claims network {network.name} not removed: {error}")
    for state_dir in state_dirs if os.geteuid() == 0 else ():  # only root's agents set rules
        try:
            Firewall().remove(IsolationPlan.of_state_dir(state_dir).rules)
        except FirewallError as error:
            print(f"firewall rules of {state_dir} not removed: {error}")
