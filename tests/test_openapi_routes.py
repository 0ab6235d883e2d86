"""/openapi.json against the app itself: every route the URL map serves is declared and documented,
the document lists nothing the app lacks, and every JSON answer fits the schema its route declares.

Flask's test client and the in-memory engine: no engine, no gunicorn.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from flask import Flask
from marshmallow import Schema

from tests.support.memory_engine import MemoryEngine
from tests.test_api_fast import CONTAINERS, IMAGE, auth, make_app
from utopia_agent.api import containers as containers_api
from utopia_agent.api.api_v1 import blueprint as api_v1
from utopia_agent.api.openapi import IMPLICIT_METHODS, describe_api, openapi_path
from utopia_agent import errors
from utopia_agent.errors import BodyTooLarge, EngineUnavailable, InsufficientStorage, ReadOnlyToken, Unauthorized
from utopia_agent.claims.records import ManagedContainer
from utopia_agent.schemas import ErrorSchema, HealthSchema, ResponseSchema


class SteadyEngine(MemoryEngine):
    """As DockerManager on the node view: the whole list is one tuple while no container changed,
    and each container one object while it did not change, listed or shown."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._listed: tuple[tuple, tuple] = ((), ())
        self._records: dict[str, tuple] = {}

    def _record(self, state):
        kept = self._records.get(state.id)
        if kept is None or kept[0] != state:
            kept = self._records[state.id] = (state, ManagedContainer.from_state(state))
        return kept[1]

    def list_managed(self, claim_id=None):
        if claim_id is not None:
            return super().list_managed(claim_id)
        states = tuple(self._managed())
        if self._listed[0] != states:
            self._listed = (states, tuple(self._record(state) for state in states))
        return self._listed[1]

    def get_managed(self, container_id):
        return self._record(self.containers[super().get_managed(container_id).id])


@pytest.fixture
def client(tmp_path):
    """The app on a SteadyEngine, through Flask's test client (`client.application` is the app)."""
    app = make_app(tmp_path, SteadyEngine(images={IMAGE: {}}))
    yield app.test_client()
    app.extensions["utopia"].close()


def expected_routes(app: Flask) -> dict[tuple[str, str], set[str]]:
    """(path, method) -> response statuses, from the URL map and each view's declaration."""
    routes = {}
    for rule in app.url_map.iter_rules():
        declared = getattr(app.view_functions[rule.endpoint], "operation", None)
        assert declared is not None, f"{rule.rule} has no declaration"
        statuses = {response.status for response in declared.responses} | {failure.status for failure in declared.failures}
        if rule.endpoint.startswith(f"{api_v1.name}.") or declared.security:
            statuses.add(Unauthorized.status)
        if declared.body is not None:
            statuses.add(BodyTooLarge.status)
        behind_token = rule.endpoint.startswith(f"{api_v1.name}.")
        for method in rule.methods - IMPLICIT_METHODS:
            # The read-only token is refused on every method but GET behind the token, new routes included.
            refused_read_only = {ReadOnlyToken.status} if behind_token and method != "GET" else set()
            # A method that may write may find the state dir full.
            state_dir_full = {InsufficientStorage.status} if behind_token and method != "GET" else set()
            routes[(openapi_path(rule), method.lower())] = {str(status) for status in statuses | refused_read_only | state_dir_full}
    return routes


def test_the_document_lists_exactly_the_routes_the_app_serves(client):
    document = client.get("/openapi.json").get_json()
    documented = {
        (path, method): set(operation["responses"]) for path, methods in document["paths"].items() for method, operation in methods.items()
    }
    assert documented == expected_routes(client.application)


def test_a_route_without_a_declaration_fails_the_document(client):
    app = client.application
    app.add_url_rule("/undeclared", "undeclared", lambda: "")
    with pytest.raises(LookupError, match="/undeclared"):
        describe_api(app)


def test_a_path_parameter_the_declaration_does_not_document_fails_the_document(client):
    app = client.application
    declared_view = app.view_functions["api_v1.containers.list_containers"]
    app.add_url_rule("/api/v1/containers/<claim>/extra", "extra", declared_view)
    with pytest.raises(LookupError, match="claim"):
        describe_api(app)


def test_every_json_answer_fits_the_schema_its_route_declares(client, monkeypatch):
    """...and each dump by ResponseSchema's plan is the JSON marshmallow's own dump would give."""
    planned = ResponseSchema._serialize

    def compared(schema, obj, *, many=False):
        dumped = planned(schema, obj, many=many)
        assert json.dumps(dumped) == json.dumps(Schema._serialize(schema, obj, many=many)), type(schema).__name__
        return dumped

    monkeypatch.setattr(ResponseSchema, "_serialize", compared)
    app = client.application
    created = client.post(CONTAINERS, json={"claim_id": "shapes", "image": IMAGE, "gpu_count": 2}, headers=auth())
    assert created.status_code == 201, created.get_data(as_text=True)
    container_id = created.get_json()["container_id"]
    uuid = next(gpu["uuid"] for gpu in client.get("/api/v1/gpus", headers=auth()).get_json() if gpu["state"] == "free")
    requests = [
        ("get", CONTAINERS, None),
        ("get", f"{CONTAINERS}?claim_id=shapes", None),
        ("get", f"{CONTAINERS}/{container_id}", None),
        ("get", f"{CONTAINERS}/{container_id}/stats", None),
        ("get", "/api/v1/metrics", None),
        ("get", "/api/v1/gpus", None),
        ("post", f"/api/v1/gpus/{uuid}/quarantine", {"reason": "fan"}),
        ("delete", f"/api/v1/gpus/{uuid}/quarantine", None),
        ("get", "/api/v1/node", None),
        ("post", "/api/v1/node/drain", {"reason": "upgrade"}),
        ("delete", "/api/v1/node/drain", None),
        ("get", "/health", None),
    ]
    adapter = app.url_map.bind("localhost")
    for method, url, body in requests:
        response = client.open(url, method=method.upper(), json=body, headers=auth())
        endpoint, _ = adapter.match(url.partition("?")[0], method=method.upper())
        assert response.status_code < 300, (method, url, response.get_json())
        [declared] = [r for r in app.view_functions[endpoint].operation.responses if r.status == response.status_code]
        assert declared.schema.validate(response.get_json()) == {}, (method, url, response.get_json())

    shown = client.get(f"{CONTAINERS}/{container_id}", headers=auth()).get_json()
    assert shown["exit_code"] is None and shown["finished"] == 0 and len(shown["gpu_ids"]) == 2
    gpus = client.get("/api/v1/metrics", headers=auth()).get_json()["gpus"]
    assert sorted(gpu["id"] for gpu in gpus if gpu["busy"]) == shown["gpu_ids"]
    assert "reason" not in client.get("/health").get_json()
    app.extensions["utopia"].docker.fail_next("ping", EngineUnavailable("the engine does not answer"))
    unhealthy = client.get("/health")
    assert unhealthy.status_code == 503 and unhealthy.headers["Retry-After"] == "5"
    assert unhealthy.get_json()["reason"] == "the engine does not answer" and HealthSchema().validate(unhealthy.get_json()) == {}


def test_each_container_is_dumped_once_per_change_listed_or_shown(client, monkeypatch):
    dumped = []
    dump = containers_api._container.dump
    monkeypatch.setattr(containers_api._container, "dump", lambda obj: dumped.append(obj.claim_id) or dump(obj))
    created = client.post(CONTAINERS, json={"claim_id": "one", "image": IMAGE}, headers=auth())
    assert created.status_code == 201
    first = [client.get(CONTAINERS, headers=auth()).get_data() for _ in range(3)]
    assert client.get(f"{CONTAINERS}/{created.get_json()['container_id']}", headers=auth()).status_code == 200
    assert client.post(CONTAINERS, json={"claim_id": "two", "image": IMAGE}, headers=auth()).status_code == 201
    second = client.get(CONTAINERS, headers=auth()).get_json()
    assert dumped == ["one", "two"] and first[0] == first[1] == first[2]
    assert sorted(container["claim_id"] for container in second) == ["one", "two"]


def test_every_field_an_error_is_raised_with_is_a_field_of_the_error_schema():
    """Error bodies are dumped through ErrorSchema, which keeps only its own fields: a detail given
    to an error anywhere in the package and missing from the schema would vanish from the answer."""
    error_classes = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, errors.AgentError)}
    given: dict[str, set[str]] = {}
    for path in Path(errors.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in error_classes or (name == "cls" and path.name == "errors.py"):
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        given.setdefault(keyword.arg, set()).add(f"{path.name}:{node.lineno}")
    assert {"claim_id", "free_gpus", "errors"} <= set(given), "the scan finds the details errors are raised with"
    missing = {field: sorted(places) for field, places in given.items() if field not in ErrorSchema().fields}
    assert not missing, missing
