"""HTTPS and read-only token settings: each bad one refused by name in one line, at start; the
read-only token's rule through Flask's test client. No engine: certificates made by openssl."""

from __future__ import annotations

import time

import pytest

from tests.support.certificates import Pki, tls_env
from tests.support.memory_engine import MemoryEngine
from tests.test_api_fast import CONTAINERS, IMAGE, TOKEN, make_app
from tests.test_startup import run_gunicorn
from utopia_agent.config import CERT_VARIABLE, ConfigError, certificate_facts, load_config

READ_TOKEN = "reads-only-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


def configured(tmp_path, **env: str):
    return load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"), **env},
                       ephemeral_ports_path=tmp_path / "none")


def test_a_good_pair_serves_tls_1_2_and_up_and_a_client_ca_asks_for_certificates(pki, tmp_path):
    config = configured(tmp_path, **tls_env(pki.server, client_ca=pki.ca_file))
    context = config.tls.server_context()
    assert context.minimum_version.name == "TLSv1_2" and context.verify_mode.name == "CERT_REQUIRED"
    assert configured(tmp_path).tls is None, "plain HTTP unless told"


def test_bad_tls_settings_are_refused_by_name(pki, tmp_path):
    """Half a pair is refused with the configuration; the files' faults when the pair is loaded."""
    other = pki.authority.issue("other")
    expired = pki.authority.issue("expired", not_before=time.time() - 3 * 86400, not_after=time.time() - 86400)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    cert, key, client_ca = "UTOPIA_AGENT_TLS_CERT_FILE", "UTOPIA_AGENT_TLS_KEY_FILE", "UTOPIA_AGENT_TLS_CLIENT_CA_FILE"
    cases = [
        ({cert: str(pki.server.cert)}, key, "not set, but UTOPIA_AGENT_TLS_CERT_FILE is"),
        ({key: str(pki.server.key)}, cert, "not set, but UTOPIA_AGENT_TLS_KEY_FILE is"),
        ({client_ca: str(pki.ca_file)}, client_ca, "client certificates need HTTPS"),
        ({cert: str(pki.server.cert), key: str(other.key)}, key, "KEY_VALUES_MISMATCH"),
        ({cert: str(pki.server.cert), key: str(tmp_path / "missing.key")}, key, "cannot read"),
        ({cert: str(tmp_path / "missing.pem"), key: str(pki.server.key)}, cert, "cannot read"),
        ({cert: str(garbage), key: str(pki.server.key)}, cert, "holds no PEM certificate"),
        ({**tls_env(expired)}, cert, "expired at"),
        ({**tls_env(pki.server), client_ca: str(garbage)}, client_ca, "cannot load CA certificates"),
    ]
    for env, variable, said in cases:
        with pytest.raises(ConfigError) as refused:
            configured(tmp_path, **env).tls.server_context()  # as the master loads it at start, and on SIGHUP
        assert refused.value.variable == variable and said in str(refused.value), (env, str(refused.value))
        assert "\n" not in str(refused.value)


def test_the_certificate_facts_name_its_subject_its_names_and_its_expiry(pki, tmp_path):
    """What `check`, the SIGHUP log line and the expiry gauge say, read without an engine."""
    soon = pki.authority.issue("soon", not_after=time.time() + 5 * 86400)
    facts = certificate_facts(soon.cert, CERT_VARIABLE)
    assert facts.subject == "CN=soon" and abs(facts.days_left() - 5) < 0.01
    served = certificate_facts(pki.server.cert, CERT_VARIABLE)
    assert served.subject == "CN=server" and {"DNS:localhost", "IP Address:127.0.0.1"} <= set(served.names)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(soon.cert.read_bytes() + pki.ca_file.read_bytes())
    assert certificate_facts(chain, CERT_VARIABLE) == facts, "the first certificate of a chain is the served one"
    key_only = tmp_path / "key-only.pem"
    key_only.write_bytes(soon.key.read_bytes())
    with pytest.raises(ConfigError) as refused:
        certificate_facts(key_only, CERT_VARIABLE)
    assert refused.value.variable == CERT_VARIABLE and "holds no PEM certificate" in str(refused.value)


def test_the_read_only_token_must_differ_from_the_token(tmp_path):
    with pytest.raises(ConfigError, match="must differ") as refused:
        configured(tmp_path, UTOPIA_AGENT_READ_TOKEN="t")
    assert refused.value.variable == "UTOPIA_AGENT_READ_TOKEN"
    with pytest.raises(ConfigError) as unreadable:
        configured(tmp_path, UTOPIA_AGENT_READ_TOKEN_FILE=str(tmp_path / "missing"))
    assert unreadable.value.variable == "UTOPIA_AGENT_READ_TOKEN_FILE"
    token_file = tmp_path / "read-token"
    token_file.write_text("from-a-file\n")
    assert configured(tmp_path, UTOPIA_AGENT_READ_TOKEN_FILE=str(token_file)).read_token == "from-a-file"


def test_an_expired_certificate_stops_gunicorn_in_one_line_and_no_worker_refuses_to_start_for_it(pki, tmp_path):
    expired = pki.authority.issue("expired-start", not_before=time.time() - 3 * 86400, not_after=time.time() - 86400)
    result = run_gunicorn({"UTOPIA_AGENT_TOKEN": "t", **tls_env(expired)}, tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"utopia-agent: configuration error: UTOPIA_AGENT_TLS_CERT_FILE: the certificate in {expired.cert} expired at "
    ), lines
    # A worker's app reads the configuration again: a pair broken since the master loaded it
    # must not stop a respawned worker (and with it the agent); the worker serves the master's.
    assert configured(tmp_path, **tls_env(expired)).tls.cert_file == expired.cert


@pytest.fixture
def client(tmp_path):
    app = make_app(tmp_path, MemoryEngine(images={IMAGE: {}}), UTOPIA_AGENT_READ_TOKEN=READ_TOKEN)
    yield app.test_client()
    app.extensions["utopia"].close()
    assert app.extensions["undeclared"] == []


def test_the_read_only_token_reads_and_is_refused_every_other_method(client):
    reads = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert client.get(CONTAINERS, headers=reads).status_code == 200
    assert client.head(CONTAINERS, headers=reads).status_code == 200
    assert client.get("/metrics", headers=reads).status_code == 200
    refused = client.post(CONTAINERS, headers=reads, json={"claim_id": "c", "image": IMAGE})
    assert refused.status_code == 403 and refused.get_json()["error"] == "read_only_token"
    assert client.get(CONTAINERS, headers=reads).get_json() == [], "nothing was created"
    created = client.post(CONTAINERS, headers={"Authorization": f"Bearer {TOKEN}"}, json={"claim_id": "c", "image": IMAGE})
    assert created.status_code == 201
    wrong = client.get(CONTAINERS, headers={"Authorization": f"Bearer {READ_TOKEN}x"})
    assert wrong.status_code == 401
