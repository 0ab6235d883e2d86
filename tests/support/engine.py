"""Real parts for the tests: a Docker engine, a test image, and local registries.

The machines the tests run on have no GPU and no internet, so everything here is
built locally (see docs/test-infrastructure.md): the engine is the real dockerd
with a stand-in NVIDIA hook on its PATH, the image is Debian's static busybox
imported as a root filesystem, and registries listen on loopback only.
"""

from __future__ import annotations

import http.client
import ipaddress
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import docker.errors
from docker.types import DeviceRequest

from tests.support.polling import wait_for
from utopia_agent.allocation.allocator import port_is_free
from utopia_agent.config import DEFAULT_HOST_PORT_RANGE

TEST_IMAGE = "utopia-test/busybox:latest"
HOOK_DIR = Path(__file__).resolve().parent
BUSYBOX_PATHS = ("/usr/bin/busybox", "/bin/busybox")
APPLETS = (
    "sh", "sleep", "env", "cat", "httpd", "ls", "id", "true", "false", "echo",
    "printenv", "wget", "nc", "ps", "kill", "mkdir", "touch", "rm", "date",
    "hostname", "head", "tail", "grep", "wc", "dd",
)
NVIDIA_DRIVER_MISSING = "could not select device driver"  # 'nvidia' from the SDK, '' from docker run --gpus


class EngineUnavailable(RuntimeError):
    """No engine answers and none could be started; outside CI the caller may skip."""


class EngineStartError(RuntimeError):
    """Like EngineUnavailable, but under CI=true, where a missing engine is a failure.

    Deliberately not a subclass of EngineUnavailable, so a conftest that turns
    EngineUnavailable into a skip still fails loudly in CI.
    """


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The host ports the test agents allow. free_port() answers from the kernel's ephemeral range,
# which the agent refuses, so a host port for a container comes from free_host_port().
TEST_HOST_PORT_RANGE = DEFAULT_HOST_PORT_RANGE


def free_host_port() -> int:
    """A port in TEST_HOST_PORT_RANGE free over TCP and UDP right now, by the agent's own check.

    Random, so that test runs side by side on one machine seldom pick the same one.
    """
    low, high = TEST_HOST_PORT_RANGE
    for port in random.sample(range(low, high + 1), 100):
        if port_is_free(port, "tcp") and port_is_free(port, "udp"):
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- engine


def _connect(base_url: str | None, timeout: float) -> docker.DockerClient | None:
    """A client whose engine answers a ping, or None."""
    try:
        if base_url is None:
            client = docker.from_env(timeout=timeout)
        else:
            client = docker.DockerClient(base_url=base_url, timeout=timeout)
        client.ping()
        return client
    except Exception:
        return None


@dataclass
class EngineHandle:
    """The engine the tests use, and whether this test run started it (and so must stop it)."""

    client: docker.DockerClient
    base_url: str | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def started_by_us(self) -> bool:
        return self.process is not None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop dockerd if this run started it; an engine found running is left alone."""
        if self._stopped:
            return
        self._stopped = True
        self.client.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def ensure_engine(
    *,
    base_url: str | None = None,
    dockerd_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    client_timeout: float = 120.0,
) -> EngineHandle:
    """Use the engine that answers, else start dockerd with the stand-in hook first on PATH.

    `base_url`/`dockerd_args`/`env` (added to dockerd's environment, which its runtimes
    inherit) exist so a test can start a private engine; normally all are left out
    (DOCKER_HOST or the local socket, default data root).
    Raises EngineStartError under CI=true and EngineUnavailable otherwise.
    """
    client = _connect(base_url, 5)
    if client is not None:
        client.api.timeout = client_timeout
        return EngineHandle(client=client, base_url=base_url)

    fail = EngineStartError if os.environ.get("CI") == "true" else EngineUnavailable
    target = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if os.environ.get("DOCKER_HOST") and base_url is None:
        raise fail(f"no engine answers at DOCKER_HOST={target}, and DOCKER_HOST is not started here")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise fail("no engine answers and dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise fail("no engine answers and starting dockerd needs root")

    fd, log_name = tempfile.mkstemp(prefix="utopia-test-dockerd-", suffix=".log")
    log_path = Path(log_name)
    dockerd_env = dict(os.environ, **(env or {}), PATH=f"{HOOK_DIR}{os.pathsep}{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    with os.fdopen(fd, "wb") as log:
        # A new session keeps a Ctrl-C aimed at pytest from killing the engine mid-run.
        process = subprocess.Popen(
            [dockerd, *dockerd_args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=dockerd_env, start_new_session=True,
        )

    found: list[docker.DockerClient] = []

    def answers() -> bool:
        if process.poll() is not None:
            return True
        c = _connect(base_url, 2)
        if c is not None:
            found.append(c)
        return bool(found)

    wait_for(answers, timeout, 0.5)
    if not found:
        if process.poll() is None:
            what = f"did not answer at {target} within {timeout:.0f}s"
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        else:
            what = f"exited with code {process.returncode}"
        raise fail(f"started dockerd (pid {process.pid}) but it {what}; log {log_path}:\n{_tail(log_path)}")
    found[0].api.timeout = client_timeout
    return EngineHandle(client=found[0], base_url=base_url, process=process, log_path=log_path)


def engine_has_nvidia_driver(client: docker.DockerClient, image: str = TEST_IMAGE) -> bool:
    """Whether the engine can attach GPUs (it was started with the hook on its PATH).

    The engine only checks the device driver when a container starts, so the probe
    creates and starts a throwaway container with a GPU DeviceRequest.
    """
    container = client.containers.create(
        image, ["true"], labels={"utopia-test.probe": "nvidia"},
        device_requests=[DeviceRequest(driver="nvidia", device_ids=["GPU-probe"], capabilities=[["gpu"]])],
    )
    try:
        container.start()
        return True
    except docker.errors.APIError as exc:
        if NVIDIA_DRIVER_MISSING in str(exc):
            return False
        raise
    finally:
        container.remove(force=True)


def _busybox_path() -> str:
    for path in BUSYBOX_PATHS:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("no static busybox found (apt-get install busybox-static)")


def _rootfs_tar(payload: bytes = b"") -> bytes:
    """A root filesystem holding only busybox, its applets as symlinks, and an optional /payload."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(_busybox_path(), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        if payload:
            info = tarfile.TarInfo("payload")
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _import(client: docker.DockerClient, tag: str, rootfs: bytes, changes: tuple[str, ...] = ()) -> str:
    """`docker import -c 'CMD ["/bin/sh"]' [-c <change>...] - <tag>` through the SDK."""
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_data(
        rootfs, repository=repository, tag=version, changes=['CMD ["/bin/sh"]', *changes],
    )
    client.images.get(tag)
    return tag


def ensure_test_image(client: docker.DockerClient, tag: str = TEST_IMAGE) -> str:
    """Import the busybox test image unless the engine already has it; returns the tag."""
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    return _import(client, tag, _rootfs_tar())


def make_image_with(client: docker.DockerClient, tag: str, *changes: str) -> str:
    """The busybox test image under `tag` with Dockerfile lines added (`ENV A=1`, `LABEL k=v`),
    as `docker import -c` adds them: no build and no registry needed."""
    return _import(client, tag, _rootfs_tar(), changes)


def make_unique_image(client: docker.DockerClient, tag: str, payload_kib: int = 64) -> str:
    """Import a runnable busybox image whose single layer no other image shares.

    The engine skips layers it already has, so pulling anything built on the test
    image is instant; a pull of this one (after push and local removal) really
    downloads about 1 MiB of busybox plus `payload_kib` KiB of random bytes.
    """
    return _import(client, tag, _rootfs_tar(os.urandom(payload_kib * 1024)))


# --------------------------------------------------------------------------- cleanup


def remove_containers(client: docker.DockerClient, label: str) -> int:
    """Force-remove every container carrying `label` ("key" or "key=value"); returns how many."""
    removed = 0
    for container in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        try:
            container.remove(force=True, v=True)
            removed += 1
        except docker.errors.NotFound:
            pass
    return removed


def image_ids(client: docker.DockerClient) -> set[str]:
    """Every image the engine holds now, tagged or not: take it before a run, to clean up after."""
    return {image.id for image in client.images.list(all=True)}


def remove_new_dangling_images(client: docker.DockerClient, before: set[str]) -> None:
    """Remove untagged images that were not there before: layers a run's pushes and pulls left."""
    for image in client.images.list(filters={"dangling": True}):
        if image.id not in before:
            try:
                client.images.remove(image.id, force=True)
            except docker.errors.ImageNotFound:
                pass


def remove_images(client: docker.DockerClient, refs) -> None:
    """Remove each image reference that exists; missing ones are fine."""
    for ref in refs:
        try:
            client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass


# --------------------------------------------------------------------------- registries


class _LocalServer:
    """Shared shape of the loopback registries: a port, references on it, a context manager."""

    port: int

    @property
    def host(self) -> str:
        """The registry part of an image reference; the engine treats loopback as insecure."""
        return f"localhost:{self.port}"

    def ref(self, name: str) -> str:
        """`t/busybox:1` -> `localhost:<port>/t/busybox:1` (a reference already on this host is kept)."""
        return name if name.startswith(self.host + "/") else f"{self.host}/{name}"

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{auth}"""
_REGISTRY_AUTH = """\
auth:
  htpasswd:
    realm: utopia-test
    path: {htpasswd}
"""


class Registry(_LocalServer):
    """Debian's docker-registry (the real distribution registry) on 127.0.0.1, in a temp dir.

    With `users` ({name: password}) it wants credentials (htpasswd, bcrypt): every request,
    pulls, pushes and manifest checks alike, must carry a user's.
    """

    def __init__(self, start_timeout: float = 15.0, users: dict[str, str] | None = None):
        self.start_timeout = start_timeout
        self.users = dict(users or {})
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code == 401 and bool(self.users)
        except (OSError, urllib.error.URLError):
            return False

    def _auth_section(self) -> str:
        if not self.users:
            return ""
        import bcrypt  # only the private-registry tests need it

        htpasswd = self.dir / "htpasswd"
        htpasswd.write_text("".join(f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n" for name, pw in self.users.items()))
        return _REGISTRY_AUTH.format(htpasswd=htpasswd)

    def start(self) -> Registry:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise FileNotFoundError("docker-registry is not installed (apt-get install docker-registry)")
        self.dir = Path(tempfile.mkdtemp(prefix="utopia-test-registry-"))
        log_path = self.dir / "registry.log"
        auth = self._auth_section()
        # free_port() can race with another process; a few tries make that harmless.
        for _ in range(3):
            self.port = free_port()
            config = self.dir / "config.yml"
            config.write_text(_REGISTRY_CONFIG.format(root=self.dir / "data", port=self.port, auth=auth))
            with open(log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            if wait_for(lambda: self.process.poll() is not None or self._answers(), self.start_timeout):
                if self.process.poll() is None:
                    return self
                continue
            break
        log = _tail(log_path)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer /v2/ on 127.0.0.1:{self.port}:\n{log}")

    def push(self, client: docker.DockerClient, source_tag: str, repo_tag: str) -> str:
        """Push `source_tag` as `repo_tag` (host optional), then drop the local tag so a create must pull.

        Returns the full reference, e.g. `localhost:5000/t/busybox:1`. A registry with users is
        pushed to as its first user, with the credentials in the request (never `docker login`,
        whose stored credentials the agent's own pulls would then find).
        """
        ref = self.ref(repo_tag)
        repository, _, tag = ref.rpartition(":")
        client.images.get(source_tag).tag(repository, tag)
        auth = self.credentials(next(iter(self.users))) if self.users else None
        try:
            for event in client.api.push(repository, tag, stream=True, decode=True, auth_config=auth):
                if "error" in event:
                    raise RuntimeError(f"push of {ref} failed: {event['error']}")
        finally:
            client.images.remove(ref)
        return ref

    def credentials(self, user: str) -> dict[str, str]:
        """A create's `registry_auth` for one of the registry's users."""
        return {"username": user, "password": self.users[user]}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class SilentRegistry(_LocalServer):
    """Accepts TCP connections on 127.0.0.1 and never answers: a registry that hangs.

    For pull idle-timeout tests. stop() closes the held connections so the
    engine's own pull attempt ends too.
    """

    def __init__(self):
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> SilentRegistry:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="silent-registry", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)

    @property
    def connections(self) -> int:
        """How many connections it has accepted (to prove the engine reached it)."""
        return len(self._conns)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
        for conn in self._conns:
            conn.close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}


class _ThrottlingProxy(BaseHTTPRequestHandler):
    """Forwards GET/HEAD to the upstream registry; blob bodies trickle at `bytes_per_s`.

    At 0 bytes/s a blob's headers go out and its body waits until `released` is set;
    once it is, every body goes out at full speed so pulls in flight finish cleanly.
    """

    protocol_version = "HTTP/1.1"
    upstream_port: int
    bytes_per_s: int
    released: threading.Event
    holding: threading.Event

    def do_GET(self) -> None:
        self._forward(send_body=True)

    def do_HEAD(self) -> None:
        self._forward(send_body=False)

    def _forward(self, send_body: bool) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, headers=headers)
            resp = upstream.getresponse()
            self.send_response_only(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            if resp.getheader("Content-Length") is None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if send_body:
                self._copy(resp, throttle="/blobs/" in self.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            upstream.close()

    def _copy(self, resp: http.client.HTTPResponse, throttle: bool) -> None:
        throttle = throttle and not self.released.is_set()
        if throttle and self.bytes_per_s == 0:
            self.holding.set()
            self.released.wait()
            throttle = False
        chunk = max(1024, self.bytes_per_s // 10) if throttle else 64 * 1024
        while data := resp.read(chunk):
            self.wfile.write(data)
            self.wfile.flush()
            if throttle and not self.released.is_set():
                time.sleep(len(data) / self.bytes_per_s)

    def log_message(self, format: str, *args) -> None:
        pass


class SlowRegistry(_LocalServer):
    """An HTTP proxy in front of a running Registry that throttles blob downloads.

    Pull-only: push through the upstream Registry, then pull `slow.ref(name)`.
    Used to keep a pull in flight for seconds (probes must keep answering meanwhile).
    `kib_per_s=0` stalls every blob body until stop(): a pull that connects, reads
    the manifest, then makes no progress (for the pull idle timeout). stop() lets
    transfers in flight finish at full speed, so the engine's pull ends instead of
    retrying a broken download for a minute. `holding` is set once a blob body is held back:
    then a pull is in flight.
    """

    def __init__(self, upstream: Registry, kib_per_s: int = 64):
        self.upstream = upstream
        self.kib_per_s = kib_per_s
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._released = threading.Event()
        self.holding = threading.Event()

    def start(self) -> SlowRegistry:
        handler = type("Proxy", (_ThrottlingProxy,), {
            "upstream_port": self.upstream.port, "bytes_per_s": self.kib_per_s * 1024,
            "released": self._released, "holding": self.holding,
        })
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="slow-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def restart_engine(timeout: float = 90.0) -> None:
    """Stop the engine of /var/run/docker.sock and start it again as it was started: through
    systemd where systemd runs it, else with the same command line and environment."""
    if subprocess.run(["systemctl", "is-active", "--quiet", "docker"], check=False, capture_output=True).returncode == 0:
        subprocess.run(["systemctl", "restart", "docker"], check=True, capture_output=True, timeout=timeout)
    else:
        pid = int(Path("/var/run/docker.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environment = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise EngineStartError(f"dockerd (pid {pid}) did not stop within {timeout:g} s")
            time.sleep(0.2)
        with open("/var/log/utopia-test-dockerd.log", "ab") as log:
            subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_for(lambda: _connect(None, 5) is not None, timeout, interval=0.5):
        raise EngineStartError(f"the engine did not answer within {timeout:g} s of its restart")


# Test agents' claims networks: each its own /24 here, so the many agents of a test run never use
# up the engine's default address pools (about 30 bridge networks). Nothing on this machine routes it.
TEST_CLAIMS_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
_claims_subnets = iter(TEST_CLAIMS_SUPERNET.subnets(new_prefix=24))
_claims_subnets_lock = threading.Lock()


def _routed_subnets() -> list[ipaddress.IPv4Network]:
    """The subnets the host routes to a link of its own: another engine's bridge (a private engine's,
    left behind) holds its subnet there, and a network given the same would lose its traffic to it."""
    done = subprocess.run(["ip", "-4", "-o", "route", "show", "scope", "link"], capture_output=True, text=True, check=False)
    routed = []
    for line in done.stdout.splitlines():
        try:
            routed.append(ipaddress.ip_network(line.split()[0], strict=False))
        except (ValueError, IndexError):
            continue
    return routed


def claims_subnet_for_a_test() -> str:
    """A /24 for one test agent's claims network that no network of the engine holds (where an
    engine answers: a test of an agent without one needs none)."""
    try:
        networks = docker.from_env(timeout=10).api.networks()
    except docker.errors.DockerException:
        networks = []
    held = [ipaddress.ip_network(pool["Subnet"]) for network in networks
            for pool in ((network.get("IPAM") or {}).get("Config") or []) if "." in pool.get("Subnet", "")]
    held += _routed_subnets()
    with _claims_subnets_lock:
        for subnet in _claims_subnets:
            if not any(subnet.overlaps(other) for other in held):
                return str(subnet)
    raise RuntimeError(f"every /24 of {TEST_CLAIMS_SUPERNET} is held by a network of the engine")
