"""HTTPS served by the agent itself, client certificates, SIGHUP, and the read-only token.

Real gunicorn with several workers, real sockets on 127.0.0.1, certificates made by openssl
(tests/support/certificates.py). Stalled TLS clients mirror tests/test_slow_clients.py: the
handshake is read in the worker's event loop, so they hold no thread.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support.certificates import Pki, tls_env
from tests.support.polling import wait_for
from tests.test_cli import cli_env, run_cli, stderr_lines  # noqa: F401 (cli_env is a fixture)
from tests.test_slow_clients import CLOSE_MARGIN, PROBE_BOUND, PROBES
from utopia_agent.client import AgentClient, AgentUnreachable

READ_TOKEN = "read-only-token-0123456789"
READ_TIMEOUT = 2.0
NO_HELLO = 64
HALF_HANDSHAKES = 16
POLL_EVERY = 0.25


@pytest.fixture(scope="module")
def https_agent(module_agents, pki):
    """Two workers of eight threads on HTTPS, with a read-only token and a short read timeout."""
    return module_agents(
        workers=2, ca_file=pki.ca_file,
        UTOPIA_AGENT_READ_TIMEOUT=str(READ_TIMEOUT), UTOPIA_AGENT_READ_TOKEN=READ_TOKEN, **tls_env(pki.server),
    )


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Pki:
    """Another CA, which the agents never trust, with its own pairs."""
    return Pki.make(tmp_path_factory.mktemp("stranger"), "stranger-ca")


def handshake_verifies(port: int, ca_file: Path) -> bool:
    """Whether a new connection's certificate verifies against `ca_file` alone."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1"):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_https_with_the_ca_verifies_and_answers_every_route(https_agent, docker_client, test_image, nvidia_path, claim):
    client = https_agent.client
    assert https_agent.base_url.startswith("https://")
    assert client.health().status == "healthy"
    assert client.openapi()["info"]["title"] == "Utopia node agent"
    created = client.create(claim(), test_image, gpu_count=1, command=["sh", "-c", "echo over-tls; sleep 300"])
    assert client.get(created.container_id).claim_id == claim()
    assert [c.id for c in client.list(claim())] == [created.container_id]
    assert wait_for(lambda: "over-tls" in client.logs(created.container_id), 10)
    assert len(client.stats(created.container_id).gpus) == 1
    assert client.metrics().gpus and client.node()
    free = next(gpu.uuid for gpu in client.gpus() if gpu.state == "free")
    client.quarantine(free, "tls test")
    client.release(free)
    client.drain("tls test")
    client.resume()
    assert "utopia_agent_tls_certificate_expiry_seconds" in client.prometheus()
    client.delete(created.container_id)
    assert client.list(claim()) == []


def test_plain_http_to_the_https_port_gets_no_answer_a_client_could_take_for_one(https_agent):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{https_agent.port}/health", timeout=10)
    with socket.create_connection(("127.0.0.1", https_agent.port), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/" not in received and b"healthy" not in received, received


def test_with_a_client_ca_only_a_certificate_it_signed_gets_in_and_the_token_is_still_needed(agent_factory, pki, stranger):
    agent = agent_factory(workers=2, ca_file=pki.ca_file, client_cert=(pki.client.cert, pki.client.key),
                          **tls_env(pki.server, client_ca=pki.ca_file))
    url = agent.base_url + "/api/v1/containers"
    token = {"Authorization": f"Bearer {agent.token}"}
    refused = {
        "no certificate": None,
        "a stranger CA's": (str(stranger.client.cert), str(stranger.client.key)),
        "a server certificate of a stranger": (str(stranger.server.cert), str(stranger.server.key)),
    }
    for what, cert in refused.items():
        with pytest.raises(requests.ConnectionError):
            requests.get(url, headers=token, verify=str(pki.ca_file), cert=cert, timeout=10)
            pytest.fail(f"{what} got in")
    signed = (str(pki.client.cert), str(pki.client.key))
    assert requests.get(url, headers=token, verify=str(pki.ca_file), cert=signed, timeout=10).status_code == 200
    answer = requests.get(url, verify=str(pki.ca_file), cert=signed, timeout=10)
    assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"


class StalledTlsClient:
    """A TCP connection that sends no ClientHello, half of one, or a whole one and then nothing more."""

    def __init__(self, port: int, kind: str):
        self.opened = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.closed_after: float | None = None
        if kind != "silent":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            hello = outgoing.read()
            self.sock.sendall(hello[: len(hello) // 2] if kind == "half hello" else hello)

    def poll(self) -> None:
        """Read what the agent sent (its ServerHello, for a whole ClientHello) and note when it closed the connection."""
        if self.closed_after is not None:
            return
        try:
            gone = self.sock.recv(65536, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            self.closed_after = time.monotonic() - self.opened
            self.sock.close()


def test_stalled_handshakes_hold_off_no_probe_and_are_closed_after_the_read_timeout(https_agent, pki):
    kinds = ["silent"] * NO_HELLO + ["half hello", "whole hello"] * (HALF_HANDSHAKES // 2)
    stalled = [StalledTlsClient(https_agent.port, kind) for kind in kinds]
    try:
        durations = []
        for _ in range(PROBES):
            started = time.monotonic()
            # A new connection each time: its handshake competes with the stalled ones.
            answer = requests.get(https_agent.base_url + "/health", verify=str(pki.ca_file), timeout=PROBE_BOUND * 5)
            durations.append(time.monotonic() - started)
            assert answer.status_code == 200
        for client in stalled:
            client.poll()

        def all_closed() -> bool:
            for client in stalled:
                client.poll()
            return all(client.closed_after is not None for client in stalled)

        closed = wait_for(all_closed, READ_TIMEOUT + CLOSE_MARGIN + 1, interval=POLL_EVERY)
    finally:
        for client in stalled:
            client.sock.close()
    assert max(durations) < PROBE_BOUND, durations
    assert closed, "stalled TLS connections still open"
    lifetimes = sorted(client.closed_after for client in stalled)
    assert READ_TIMEOUT <= lifetimes[0] and lifetimes[-1] <= READ_TIMEOUT + CLOSE_MARGIN + POLL_EVERY, lifetimes


class RequestLoop:
    """Requests in a loop until stopped, on new connections and on one kept alive; every failure is kept."""

    def __init__(self, agent, ca_bundle: Path):
        self.agent = agent
        self.verify = str(ca_bundle)
        self.failures: list[str] = []
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        kept = requests.Session()
        kept.headers["Authorization"] = f"Bearer {self.agent.token}"
        kept.trust_env = False  # else REQUESTS_CA_BUNDLE overrides `verify`
        kept.verify = self.verify
        while not self._stop.is_set():
            for session in (kept, None):
                try:
                    if session is None:
                        answer = requests.get(self.agent.base_url + "/health", verify=self.verify, timeout=10)
                    else:
                        answer = session.get(self.agent.base_url + "/api/v1/containers", timeout=10)
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    self.answered += 1
                except requests.RequestException as error:
                    self.failures.append(repr(error))
            time.sleep(0.02)
        kept.close()


def open_kept_alive(port: int, ca_file: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca_file))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def health_on(conn: ssl.SSLSocket) -> bytes:
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"healthy" not in answer:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed: {answer!r}"
        answer += chunk
    return answer


FORK_PAUSE_SECONDS = 5


def test_sighup_serves_new_files_to_new_connections_drops_nothing_and_keeps_the_old_pair_for_a_broken_one(agent_factory, pki, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "server.pem", served / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    renewed = Pki.make(tmp_path / "renewed", "renewed-ca")
    bundle = tmp_path / "both-cas.pem"
    bundle.write_text(pki.ca_file.read_text() + renewed.ca_file.read_text())
    agent = agent_factory(workers=2, ca_file=bundle, UTOPIA_AGENT_TLS_CERT_FILE=str(cert), UTOPIA_AGENT_TLS_KEY_FILE=str(key))
    workers = set(agent.worker_pids())
    assert handshake_verifies(agent.port, pki.ca_file)

    with RequestLoop(agent, bundle) as loop:
        kept_alive = [open_kept_alive(agent.port, pki.ca_file) for _ in range(4)]
        for conn in kept_alive:
            assert health_on(conn).startswith(b"HTTP/1.1 200")
        assert wait_for(lambda: loop.answered > 10, 30)

        shutil.copy(renewed.server.cert, cert)
        shutil.copy(renewed.server.key, key)
        agent.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: handshake_verifies(agent.port, renewed.ca_file), 30), agent.log()[-3000:]
        # Every worker serves it: each of many new connections verifies against the new CA only.
        assert all(handshake_verifies(agent.port, renewed.ca_file) for _ in range(20))
        for conn in kept_alive:
            assert health_on(conn).startswith(b"HTTP/1.1 200"), "a kept-alive connection was dropped"
            conn.close()

        refusals_before = agent.log().count("kept the certificate in service")
        half_written = renewed.server.key.read_bytes()
        key.write_bytes(half_written[: len(half_written) // 2])
        agent.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: agent.log().count("kept the certificate in service") > refusals_before, 30)
        shutil.copy(pki.server.cert, cert)  # a whole certificate with the other certificate's key
        shutil.copy(renewed.server.key, key)
        agent.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: agent.log().count("kept the certificate in service") > refusals_before + 1, 30)
        answered = loop.answered
        assert wait_for(lambda: loop.answered > answered + 10, 30)

    refusals = [line for line in agent.log().splitlines() if "kept the certificate in service" in line]
    assert len(refusals) == 2, refusals
    assert all("UTOPIA_AGENT_TLS_KEY_FILE" in line and "BEGIN" not in line for line in refusals)
    assert all(handshake_verifies(agent.port, renewed.ca_file) for _ in range(10)), "a broken pair replaced the one in service"
    assert loop.failures == [], loop.failures[:5]
    assert set(agent.worker_pids()) == workers, "SIGHUP on HTTPS replaces no worker"

    # With the broken pair still on disk, workers that die are replaced by ones serving the pair in service
    # (no old worker is left to answer instead: a new one that failed to boot would stop the agent).
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(set(agent.worker_pids()) - workers) == 2, 30), agent.log()[-3000:]
    assert all(handshake_verifies(agent.port, renewed.ca_file) for _ in range(20)), agent.log()[-3000:]
    assert agent.process.poll() is None


def test_a_worker_forked_during_a_reload_gets_its_sighup_and_serves_the_new_pair(agent_factory, pki, tmp_path):
    """The one worker is killed and its replacement pauses after its fork (tests/support/slow_fork.conf.py),
    forked with the pair then in service; the reload's SIGHUP comes during the pause. It is held until the
    worker's handler is in place, so the worker serves the new pair, rather than the old one for good."""
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "server.pem", served / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    renewed = Pki.make(tmp_path / "renewed", "renewed-ca")
    bundle = tmp_path / "both-cas.pem"
    bundle.write_text(pki.ca_file.read_text() + renewed.ca_file.read_text())
    agent = agent_factory(workers=1, start=False, ca_file=bundle, UTOPIA_AGENT_TLS_CERT_FILE=str(cert), UTOPIA_AGENT_TLS_KEY_FILE=str(key),
                          UTOPIA_TEST_FORK_PAUSE=str(FORK_PAUSE_SECONDS))
    agent.config = str(Path(__file__).parent / "support" / "slow_fork.conf.py")
    agent.start()
    [first] = agent.worker_pids()
    assert handshake_verifies(agent.port, pki.ca_file)

    shutil.copy(renewed.server.cert, cert)
    shutil.copy(renewed.server.key, key)
    os.kill(first, signal.SIGKILL)
    replacement = wait_for(lambda: [pid for pid in agent.worker_pids() if pid != first], 10)
    assert replacement, agent.log()[-3000:]
    paused_at = time.monotonic()
    agent.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: new connections get the certificate" in agent.log(), FORK_PAUSE_SECONDS), agent.log()[-3000:]
    assert time.monotonic() - paused_at < FORK_PAUSE_SECONDS, "the reload came after the pause: nothing was tested"
    assert wait_for(lambda: handshake_verifies(agent.port, renewed.ca_file), 30), agent.log()[-3000:]
    assert all(handshake_verifies(agent.port, renewed.ca_file) for _ in range(10))
    assert agent.worker_pids() == replacement and agent.process.poll() is None, "the SIGHUP ended no worker"


def test_the_read_token_reads_and_every_write_is_refused_with_nothing_changed(https_agent, docker_client, test_image, claim):
    full = https_agent.client
    created = full.create(claim(), test_image, command=["sleep", "300"])
    gpu = full.gpus()[0].uuid
    reader = requests.Session()
    reader.trust_env = False  # else REQUESTS_CA_BUNDLE overrides `verify`
    reader.verify = str(https_agent.ca_file)
    reader.headers["Authorization"] = f"Bearer {READ_TOKEN}"
    url = https_agent.base_url
    for path in ("/api/v1/containers", f"/api/v1/containers/{created.container_id}", f"/api/v1/containers/{created.container_id}/logs",
                 f"/api/v1/containers/{created.container_id}/stats", "/api/v1/gpus", "/api/v1/node", "/api/v1/metrics", "/metrics"):
        assert reader.get(url + path, timeout=30).status_code == 200, path

    writes = [
        ("POST", "/api/v1/containers", {"claim_id": claim("1"), "image": test_image}),
        ("DELETE", f"/api/v1/containers/{created.container_id}", None),
        ("POST", f"/api/v1/containers/{created.container_id}/stop", None),
        ("POST", f"/api/v1/containers/{created.container_id}/start", None),
        ("POST", "/api/v1/node/drain", {"reason": "read token"}),
        ("DELETE", "/api/v1/node/drain", None),
        ("POST", f"/api/v1/gpus/{gpu}/quarantine", {"reason": "read token"}),
        ("DELETE", f"/api/v1/gpus/{gpu}/quarantine", None),
    ]
    # And every other method the document lists, with any path parameter, so routes added later
    # (images, ...) are held to the same rule without a word here.
    filled = {"{container_id}": created.container_id, "{uuid}": gpu}
    documented = [
        (method.upper(), re.sub(r"\{[^}]+\}", lambda name: filled.get(name.group(0), "any"), path), {})
        for path, methods in full.openapi()["paths"].items() for method in methods if method != "get"
    ]
    assert {(method, path) for method, path, _ in writes} <= {(method, path) for method, path, _ in documented}
    for method, path, body in writes + documented:
        answer = reader.request(method, url + path, json=body, timeout=30)
        assert answer.status_code == 403 and answer.json()["error"] == "read_only_token", (method, path, answer.text)

    assert [c.id for c in full.list(claim())] == [created.container_id] and full.list(claim("1")) == []
    assert docker_client.containers.get(created.container_id).status == "running"
    assert not full.node()["drain"]["draining"]
    assert next(g for g in full.gpus() if g.uuid == gpu).state != "quarantined"
    assert READ_TOKEN not in https_agent.log()
    full.delete(created.container_id)


def test_the_client_and_the_cli_speak_https_and_fail_in_one_line_without_the_ca(https_agent, pki):
    assert AgentClient(https_agent.base_url, token=https_agent.token, ca_file=pki.ca_file).health().status == "healthy"
    with pytest.raises(AgentUnreachable) as refused:
        AgentClient(https_agent.base_url, token=https_agent.token, retries=3).list()
    assert "TLS failed: certificate verify failed" in str(refused.value) and "\n" not in str(refused.value)

    env = {"PATH": "/usr/bin:/bin", "UTOPIA_AGENT_TOKEN": https_agent.token}
    listed = run_cli("ps", "--url", https_agent.base_url, "--ca-file", str(pki.ca_file), env=env)
    assert listed.returncode == 0, listed.stderr
    from_env = run_cli("node", "--url", https_agent.base_url, env={**env, "UTOPIA_AGENT_CA_FILE": str(pki.ca_file)})
    assert from_env.returncode == 0, from_env.stderr
    unverified = run_cli("ps", "--url", https_agent.base_url, env=env)
    assert unverified.returncode == 3
    assert len(stderr_lines(unverified)) == 1 and "TLS failed: certificate verify failed" in unverified.stderr, unverified.stderr


def test_the_cli_presents_its_client_certificate(agent_factory, pki):
    agent = agent_factory(workers=1, ca_file=pki.ca_file, client_cert=(pki.client.cert, pki.client.key),
                          **tls_env(pki.server, client_ca=pki.ca_file))
    env = {"PATH": "/usr/bin:/bin", "UTOPIA_AGENT_TOKEN": agent.token, "UTOPIA_AGENT_CA_FILE": str(pki.ca_file)}
    presented = run_cli("ps", "--url", agent.base_url, "--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key), env=env)
    assert presented.returncode == 0, presented.stderr
    without = run_cli("ps", "--url", agent.base_url, env=env)
    assert without.returncode == 3 and len(stderr_lines(without)) == 1, without.stderr
    half = run_cli("ps", "--url", agent.base_url, "--cert-file", str(pki.client.cert), env=env)
    assert half.returncode == 2 and stderr_lines(half) == ["utopia-agent: a client certificate needs both --cert-file and --key-file"]


def test_check_reports_the_certificate_and_warns_before_it_expires(cli_env, pki, engine):  # noqa: F811 (the fixture)
    """`check` passes only where the agent could run, engine included; the certificate's own reading
    is held without an engine by the certificate_facts tests."""
    env = {**cli_env, **tls_env(pki.server)}
    checked = run_cli("check", env=env)
    assert checked.returncode == 0, checked.stderr
    line = next(line for line in checked.stdout.splitlines() if line.startswith("tls:"))
    assert "CN=server" in line and "IP Address:127.0.0.1" in line and "DNS:localhost" in line and "expires 20" in line
    assert "warning" not in checked.stderr

    soon = pki.authority.issue("expiring", not_after=time.time() + 5 * 86400)
    warned = run_cli("check", env={**cli_env, **tls_env(soon)})
    assert warned.returncode == 0, warned.stderr
    assert [line for line in stderr_lines(warned) if "warning" in line] == [
        f"utopia-agent: warning: the certificate in {soon.cert} expires in 5.0 days; renew it and send the agent SIGHUP"
    ]


def test_an_answer_that_closes_the_connection_ends_with_tls_close_notify(https_agent, pki):
    """A strict client (ragged EOFs not suppressed) reads the whole answer and a clean end; a client
    that offers HTTP/2 is told HTTP/1.1, the one the agent speaks."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", https_agent.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as conn:
        assert conn.selected_alpn_protocol() == "http/1.1"
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):  # SSLEOFError here if the agent just closed the TCP connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}\n"), answer


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_served_with_forward_secret_aead_suites(https_agent, pki, version):
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", https_agent.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        suite, negotiated, _ = conn.cipher()
        assert negotiated == version.name.replace("_", ".")  # TLSv1.2, TLSv1.3
        assert health_on(conn).startswith(b"HTTP/1.1 200")
    assert "GCM" in suite or "CHACHA20" in suite, suite
    assert version == ssl.TLSVersion.TLSv1_3 or suite.startswith("ECDHE"), suite

