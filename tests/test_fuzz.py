"""schemathesis against the live agent under gunicorn and the real engine.

`st run` drives every operation of /openapi.json with valid and invalid requests (coverage,
fuzzing and stateful phases); each answer must be no 5xx, a documented status with the
documented content type, and match its schema; invalid data must be refused; and every
secured route must refuse a request without the token.

It runs as a subprocess because schemathesis' pytest integration (4.x `from_fixture`) sets
`Node._nodeid`, which pytest 9 no longer has. This module doubles as its hooks module
(SCHEMATHESIS_HOOKS): the hooks swap image references that would be pulled from a registry
for the local test image, give claim ids this run's prefix (so the conftest's cleanup removes
whatever the fuzzer creates), keep DELETE away from other people's containers, and bound the
event stream (`?timeout=1` where the case asks for no end or a valid one).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time

import docker
import docker.errors
import requests
import schemathesis

from tests.support.agent import ROOT
from utopia_agent.schemas import CLAIM_ID_PATTERN, CONTAINER_ID_PATTERN, IMAGE_PATTERN, MAX_EVENTS_TIMEOUT_SECONDS

EXAMPLES_PER_OPERATION = 100
TIME_BUDGET_SECONDS = 100
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,negative_data_rejection,ignored_auth"
IMAGE_ENV = "UTOPIA_FUZZ_IMAGE"
CLAIM_PREFIX_ENV = "UTOPIA_FUZZ_CLAIM_PREFIX"
AGENT_ENV = "UTOPIA_FUZZ_AGENT"  # the agent's URL and token, for the after_call hook
MIN_TEST_CASES = 400


@schemathesis.hook
def before_call(context, case, kwargs):
    """Keep creates local and owned by this run, and DELETE away from other people's containers.

    This hook runs before every call of every phase (map_body does not reach the coverage
    phase). The engine is shared and the agent's list shows every managed container on it;
    the stateful phase feeds listed ids into DELETE, so a DELETE of anyone else's container
    is pointed at one that does not exist.
    """
    if IMAGE_ENV not in os.environ:
        return
    if case.method.upper() == "GET" and case.path == STREAM_PATH:
        _bound_the_stream(case)
    if case.method.upper() == "POST" and isinstance(case.body, dict):
        _own_the_create(case.body)
    if case.method.upper() != "DELETE":
        return
    container_id = (case.path_parameters or {}).get("container_id")
    # Ids that do not fit the pattern are refused before they reach the engine.
    if isinstance(container_id, str) and re.fullmatch(CONTAINER_ID_PATTERN, container_id) and _someone_elses(container_id):
        case.path_parameters["container_id"] = "0" * 64


@schemathesis.hook
def after_call(context, case, response):
    """A claim volume the fuzzer made is removed at once: each holds a loop device of the node's, which
    hundreds of cases would use up (for every session on the machine)."""
    if AGENT_ENV not in os.environ or case.method.upper() != "POST" or case.path != "/api/v1/volumes" or response.status_code != 201:
        return
    url, token = os.environ[AGENT_ENV].split(" ", 1)
    requests.delete(f"{url}/api/v1/volumes/{response.json()['name']}", headers={"Authorization": f"Bearer {token}"}, timeout=60)


@functools.lru_cache(maxsize=1)
def _engine() -> docker.DockerClient:
    return docker.from_env()


def _someone_elses(container_id: str) -> bool:
    try:
        labels = _engine().api.inspect_container(container_id)["Config"]["Labels"] or {}
    except docker.errors.DockerException:
        return False
    return not labels.get("utopia.claim_id", "").startswith(os.environ[CLAIM_PREFIX_ENV])


def _own_the_create(body: dict) -> None:
    """Use the local image and this run's claim prefix, without making an invalid body valid."""
    if isinstance(body.get("image"), str) and re.fullmatch(IMAGE_PATTERN, body["image"]):
        body["image"] = os.environ[IMAGE_ENV]
    if isinstance(body.get("claim_id"), str) and re.fullmatch(CLAIM_ID_PATTERN, body["claim_id"]):
        if not body["claim_id"].startswith(os.environ[CLAIM_PREFIX_ENV]):
            body["claim_id"] = (os.environ[CLAIM_PREFIX_ENV] + body["claim_id"])[:63]


def _bound_the_stream(case) -> None:
    """A stream asked for no end, or for a valid one, ends after a second (each case would otherwise
    wait out the request timeout); a case whose `timeout` is invalid is left as it is, to be refused."""
    query = dict(case.query or {})
    timeout = query.get("timeout")
    if timeout is None or (isinstance(timeout, str | int) and not isinstance(timeout, bool)
                           and str(timeout).isdigit() and 1 <= int(timeout) <= MAX_EVENTS_TIMEOUT_SECONDS):
        query["timeout"] = 1
        case.query = query


STREAM_PATH = "/api/v1/events"
# Each case of the stream takes its second: a few are enough beside its coverage phase.
STREAM_EXAMPLES = 10


# An exec session is a WebSocket, which schemathesis does not speak (tests/test_exec.py holds it to the contract).
WEBSOCKETS = ("execInteractive",)


def test_api_conforms_to_its_openapi_document(agent_factory, docker_client, test_image, claim, tmp_path):
    """Zero failures over several hundred cases; `docker_client` makes the conftest clean up after it."""
    fuzz_agent = agent_factory(workers=2)
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    # No cache in the checkout; a body over UTOPIA_AGENT_MAX_BODY_BYTES is refused with 413 before it is parsed.
    config.write_text(
        f'generation.max-examples = {EXAMPLES_PER_OPERATION}\n\n[cache]\nenabled = false\n\n'
        '[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", "413"]\n\n'
        f'[[operations]]\ninclude-path = "{STREAM_PATH}"\ngeneration.max-examples = {STREAM_EXAMPLES}\n'
    )
    env = {**os.environ, "SCHEMATHESIS_HOOKS": __name__, IMAGE_ENV: test_image, CLAIM_PREFIX_ENV: claim(""),
           AGENT_ENV: f"{fuzz_agent.base_url} {fuzz_agent.token}"}
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", fuzz_agent.base_url + "/openapi.json",
        "--checks", CHECKS,
        *(option for operation_id in WEBSOCKETS for option in ("--exclude-operation-id", operation_id)),
        "--header", f"Authorization: Bearer {fuzz_agent.token}",
        "--max-time", str(TIME_BUDGET_SECONDS),
        # One worker: with threads, CPython 3.11's ast module can fail schemathesis' own code
        # ("AST constructor recursion depth mismatch", python/cpython#106905), a flake of the tool.
        "--workers", "1",
        "--seed", "1",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--suppress-health-check", "all",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIME_BUDGET_SECONDS + 120)
    finally:
        _remove_created_by(fuzz_agent, docker_client)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    failures = output[output.find("FAILURES"):] if "FAILURES" in output else output
    assert result.returncode == 0, "\n".join(line[:300] for line in failures.splitlines()[-400:])
    summary = json.loads(report.read_text())
    generated = summary["test_cases"]["generated"]
    print(f"schemathesis: {generated} test cases in {elapsed:.0f} s, phases {summary['phases']}")
    paths = fuzz_agent.get("/openapi.json").json()["paths"]
    # schemathesis leaves out the document it was loaded from.
    documented = sum(1 for path, methods in paths.items() if path != "/openapi.json"
                     for operation in methods.values() if operation.get("operationId") not in WEBSOCKETS)
    assert summary["operations"]["tested"] == documented, output[-3000:]
    assert generated >= MIN_TEST_CASES
    strangers_deleted = [line for line in fuzz_agent.log().splitlines() if "container deleted" in line and f"claim={claim('')}" not in line]
    assert strangers_deleted == []


def _remove_created_by(agent, docker_client) -> None:
    """Remove every container the agent logged as created, whatever claim id a phase gave it."""
    for line in agent.log().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("message", "").startswith("container created"):
            try:
                docker_client.api.remove_container(event["container_id"], force=True, v=True)
            except docker.errors.NotFound:
                pass

