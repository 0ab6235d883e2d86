"""Test hosts in network namespaces, a second address of the node, and probes from containers.

An "outside world" host holds benchmark-range addresses (198.18.0.0/15), a "metadata" host holds
169.254.169.254 routed from the node, as a cloud VM's metadata service is; each serves HTTP with
busybox httpd. Everything made here is removed on exit. See docs/test-infrastructure.md.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.support.prerequisites import require

PROBE_SECONDS = 2


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class TestHost:
    namespace: str
    addresses: tuple[str, ...]

    @property
    def marker(self) -> str:
        """What its web server answers, so no other server's answer passes for it."""
        return f"utopia-test-host {self.namespace}"

    def fetch(self, url: str, marker: str) -> bool:
        """Whether an HTTP GET from inside this host gets an answer holding `marker`."""
        done = subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", _FETCH, url],
                              capture_output=True, text=True, timeout=PROBE_SECONDS + 10, check=False)
        return marker in done.stdout


@contextmanager
def namespace_host(node_address: str, addresses: tuple[str, ...], routes: tuple[str, ...] = ()) -> Iterator[TestHost]:
    """A host in a namespace of its own, linked to the node by a veth pair: the node's end holds
    `node_address` (CIDR), the host's end `addresses` (CIDRs), and the node routes `routes` to it.
    The host serves HTTP on port 80 of every address."""
    require(os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("busybox")),
            "test hosts in network namespaces need root, iproute2 and busybox")
    tag = uuid.uuid4().hex[:6]
    namespace, node_end, host_end = f"ut-ns-{tag}", f"ut-n{tag}", f"ut-h{tag}"
    web = Path(tempfile.mkdtemp(prefix="utopia-test-host-"))
    (web / "index.html").write_text(f"utopia-test-host {namespace}\n")
    server = None
    try:
        ip("netns", "add", namespace)
        ip("link", "add", node_end, "type", "veth", "peer", "name", host_end)
        ip("link", "set", host_end, "netns", namespace)
        ip("addr", "add", node_address, "dev", node_end)
        ip("link", "set", node_end, "up")
        inside = ["ip", "netns", "exec", namespace]
        for address in addresses:
            subprocess.run([*inside, "ip", "addr", "add", address, "dev", host_end], check=True)
        subprocess.run([*inside, "ip", "link", "set", host_end, "up"], check=True)
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*inside, "ip", "route", "add", "default", "dev", host_end], check=True)
        for route in routes:
            ip("route", "add", route, "dev", node_end)
        server = subprocess.Popen([*inside, "busybox", "httpd", "-f", "-p", "80", "-h", str(web)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        yield TestHost(namespace, tuple(address.split("/")[0] for address in addresses))
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        for route in routes:
            ip("route", "del", route, check=False)
        ip("link", "del", node_end, check=False)
        ip("netns", "del", namespace, check=False)
        shutil.rmtree(web, ignore_errors=True)


@contextmanager
def node_address(address: str) -> Iterator[str]:
    """A second address of the node itself, on a link of the test's own: a bridge with no ports
    (the kernel here has no dummy links), whose address is the node's all the same."""
    link = f"ut-d{uuid.uuid4().hex[:6]}"
    ip("link", "add", link, "type", "bridge")
    try:
        ip("addr", "add", f"{address}/32", "dev", link)
        ip("link", "set", link, "up")
        yield address
    finally:
        ip("link", "del", link, check=False)


NODE_MARKER = "utopia-test-node"


@contextmanager
def node_listener() -> Iterator[int]:
    """An HTTP server of the node on 0.0.0.0 (every address it has), answering NODE_MARKER; yields its port."""
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{NODE_MARKER}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Probe:
    """An HTTP GET from inside `container` to `address`:`port`, which reached its server when the
    answer holds `marker` (this machine's network may answer port 80 of unknown addresses itself)."""

    container: docker.models.containers.Container
    address: str
    port: int
    marker: str

    def reaches(self) -> bool:
        # busybox's wget crashes in the static build here; nc sends the request by hand.
        request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {PROBE_SECONDS} {self.address} {self.port}"
        _, output = self.container.exec_run(["sh", "-c", request])
        return self.marker.encode() in output


def reach_all(probes: dict[str, Probe]) -> dict[str, bool]:
    """Every probe at once (a blocked one waits out its timeout): name -> reached."""
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:
        futures = {name: pool.submit(probe.reaches) for name, probe in probes.items()}
        return {name: future.result() for name, future in futures.items()}


_FETCH = """
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(errors="replace"))
except urllib.error.HTTPError as error:
    print(error.read().decode(errors="replace"))
except OSError as error:
    print(f"failed: {error}")
"""


def node_fetch(url: str) -> str:
    """An HTTP GET from the node itself: the answer's body, or why it failed."""
    return subprocess.run([sys.executable, "-c", _FETCH, url], capture_output=True, text=True, timeout=30, check=False).stdout


TEST_DOMAIN, TEST_DOMAIN_ANSWER = "test.internal", "198.18.0.77"


@contextmanager
def dns_server(listen: str, namespace: str | None = None) -> Iterator[str]:
    """dnsmasq answering every name under TEST_DOMAIN with TEST_DOMAIN_ANSWER, on `listen` port 53
    only (in `namespace`, else the node's own), as a cloud's or a node-local resolver would."""
    require(bool(shutil.which("dnsmasq")), "a test resolver needs dnsmasq (make test installs dnsmasq-base)")
    pid_file = Path(tempfile.mkdtemp(prefix="utopia-dns-")) / "dnsmasq.pid"
    inside = ["ip", "netns", "exec", namespace] if namespace else []
    server = subprocess.Popen(
        [*inside, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={listen}",
         f"--address=/{TEST_DOMAIN}/{TEST_DOMAIN_ANSWER}", f"--pid-file={pid_file}", "--user=root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.poll() is not None:
            raise RuntimeError(f"dnsmasq did not start: {server.stderr.read().decode(errors='replace')}")
        yield listen
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(pid_file.parent, ignore_errors=True)


@contextmanager
def node_resolv_conf(*servers: str) -> Iterator[None]:
    """The node's /etc/resolv.conf naming `servers`, put back afterwards whatever happens: the
    engine copies it into each container it makes, and the machine's own lookups depend on it.
    Written in place, since it may be a bind mount."""
    path = Path("/etc/resolv.conf")
    original = path.read_bytes()
    try:
        path.write_text("".join(f"nameserver {server}\n" for server in servers))
        yield
    finally:
        path.write_bytes(original)


def resolves(container: docker.models.containers.Container, name: str = f"probe.{TEST_DOMAIN}") -> bool:
    """Whether a lookup from inside `container` (its own resolv.conf: the engine's resolver on a
    user-defined network) gets TEST_DOMAIN_ANSWER back."""
    _, output = container.exec_run(["busybox", "timeout", "6", "busybox", "nslookup", name])
    return TEST_DOMAIN_ANSWER.encode() in output
