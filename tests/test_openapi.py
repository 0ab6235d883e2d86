"""/openapi.json as a client's author meets it: names, descriptions, error codes, an example,
and a client made from it by a third-party generator (openapi-python-client) that drives the
live agent. The error table of docs/api.md and the configuration table of docs/configuration.md
are held to the code here too."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

import utopia_agent.engine.manager  # noqa: F401  (its private error classes count among the agent's errors)
from tests.support.agent import ROOT
from tests.support.engine import free_host_port
from utopia_agent.errors import AgentError
from utopia_agent.schemas import CONTAINER_EXAMPLE, ContainerSchema

OPERATION_IDS = {
    ("post", "/api/v1/containers"): "createContainer",
    ("get", "/api/v1/containers"): "listContainers",
    ("get", "/api/v1/containers/{container_id}"): "getContainer",
    ("delete", "/api/v1/containers/{container_id}"): "deleteContainer",
    ("post", "/api/v1/containers/{container_id}/stop"): "stopContainer",
    ("post", "/api/v1/containers/{container_id}/start"): "startContainer",
    ("post", "/api/v1/volumes"): "createVolume",
    ("get", "/api/v1/volumes"): "listVolumes",
    ("get", "/api/v1/volumes/{name}"): "getVolume",
    ("delete", "/api/v1/volumes/{name}"): "deleteVolume",
    ("get", "/api/v1/containers/{container_id}/logs"): "getContainerLogs",
    ("get", "/api/v1/containers/{container_id}/stats"): "getContainerStats",
    ("post", "/api/v1/containers/{container_id}/exec"): "execOnce",
    ("get", "/api/v1/containers/{container_id}/exec"): "execInteractive",
    ("get", "/api/v1/metrics"): "getNodeMetrics",
    ("get", "/api/v1/gpus"): "listGpus",
    ("post", "/api/v1/gpus/{uuid}/quarantine"): "quarantineGpu",
    ("delete", "/api/v1/gpus/{uuid}/quarantine"): "releaseGpu",
    ("get", "/api/v1/node"): "getNode",
    ("post", "/api/v1/node/drain"): "drainNode",
    ("delete", "/api/v1/node/drain"): "resumeNode",
    ("get", "/api/v1/images"): "listImages",
    ("post", "/api/v1/images"): "pullImage",
    ("delete", "/api/v1/images/{reference}"): "deleteImage",
    ("get", "/api/v1/events"): "watchEvents",
    ("get", "/health"): "getHealth",
    ("get", "/metrics"): "getPrometheusMetrics",
    ("get", "/openapi.json"): "getOpenApiDocument",
}


def agent_error_statuses() -> dict[str, int]:
    """Every error code of the agent and its status, from the error classes themselves."""
    statuses, pending = {}, [AgentError]
    while pending:
        cls = pending.pop()
        assert statuses.setdefault(cls.code, cls.status) == cls.status, f"{cls.code} has two statuses"
        pending.extend(cls.__subclasses__())
    return statuses


@pytest.fixture(scope="module")
def document(agent) -> dict:
    response = agent.get("/openapi.json", auth=False)
    assert response.status_code == 200
    return response.json()


def operations(document):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_every_operation_has_an_operation_id_and_a_declared_tag(document):
    declared = {tag["name"] for tag in document["tags"]}
    assert all(tag.get("description") for tag in document["tags"])
    found = {}
    for method, path, operation in operations(document):
        found[(method, path)] = operation["operationId"]
        assert operation["tags"] and set(operation["tags"]) <= declared, (method, path)
    assert found == OPERATION_IDS


def test_every_field_and_parameter_is_described(document):
    missing = [
        f"{name}.{field}"
        for name, schema in document["components"]["schemas"].items()
        for field, prop in schema.get("properties", {}).items()
        if not prop.get("description")
    ]
    missing += [
        f"{method} {path} ?{parameter['name']}"
        for method, path, operation in operations(document)
        for parameter in operation.get("parameters", [])
        if not parameter.get("description")
    ]
    assert missing == []


def test_error_codes_are_an_enum_and_each_response_names_its_own(document):
    statuses = agent_error_statuses()
    assert sorted(document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]) == sorted(statuses)
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") != "#/components/schemas/Error":
                continue
            named = re.findall(r"`([a-z_]+)`", response["description"].rpartition("(`error`:")[2])
            assert named, (method, path, status)
            assert {statuses[code] for code in named} == {int(status)}, (method, path, status, named)
    list_400 = document["paths"]["/api/v1/containers"]["get"]["responses"]["400"]["description"]
    assert "body" not in list_400.lower() and "query parameter" in list_400


def test_the_container_example_fits_the_schema_and_a_real_container(agent, document, test_image, claim):
    example = document["components"]["schemas"]["Container"]["example"]
    assert example == CONTAINER_EXAMPLE and ContainerSchema().validate(example) == {}
    assert all(isinstance(port, str) for port in example["ports"].values())
    created = agent.create(claim(), test_image, command=["sleep", "300"], port_mappings=[{"host_port": free_host_port(), "container_port": 8888}])
    assert created.status_code == 201, created.text
    real = agent.get(f"/api/v1/containers/{created.json()['container_id']}").json()
    assert {key: type(value) for key, value in real.items()} == {key: type(value) for key, value in example.items()}


def docs_table(name: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in docs/`name`, as lists of cells."""
    text = (ROOT / "docs" / name).read_text()
    section = text[text.index(heading):]
    table = re.search(r"^\|.*?(?=^\s*$)", section, flags=re.DOTALL | re.MULTILINE).group(0)
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return rows[2:]


def test_the_documented_error_table_lists_every_code_with_its_status():
    table = {row[1].strip("`"): int(row[0]) for row in docs_table("api.md", "\n## Errors\n")}
    assert table == agent_error_statuses()


def test_the_documented_configuration_table_lists_every_variable():
    read = set(re.findall(r'"(UTOPIA_AGENT_[A-Z_]+)"', (ROOT / "utopia_agent" / "config.py").read_text()))
    listed = {name for row in docs_table("configuration.md", "# Configuration\n") for name in re.findall(r"`(UTOPIA_AGENT_[A-Z_]+)`", " ".join(row[:2]))}
    assert read <= listed, sorted(read - listed)


@pytest.fixture
def generated_client(agent, tmp_path, monkeypatch):
    """A client package made by openapi-python-client from the live agent's /openapi.json."""
    config = tmp_path / "generator.yml"
    # The event stream's lines are read as bytes by a generated client (it knows no ndjson).
    config.write_text("post_hooks: []\ncontent_type_overrides:\n  application/x-ndjson: application/octet-stream\n")
    package = tmp_path / "utopia_client"
    result = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--url", agent.base_url + "/openapi.json",
         "--meta", "none", "--output-path", str(package), "--config", str(config), "--fail-on-warning"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    yield lambda module: importlib.import_module(f"utopia_client.{module}")
    for name in [name for name in sys.modules if name == "utopia_client" or name.startswith("utopia_client.")]:
        del sys.modules[name]


def test_a_generated_client_drives_the_agent(agent, generated_client, test_image, claim):
    client_module = generated_client("client")
    models = generated_client("models")
    create = generated_client("api.containers.create_container")
    list_containers = generated_client("api.containers.list_containers")
    get_container = generated_client("api.containers.get_container")
    delete_container = generated_client("api.containers.delete_container")
    get_node_metrics = generated_client("api.node.get_node_metrics")

    port = free_host_port()
    with client_module.AuthenticatedClient(base_url=agent.base_url, token=agent.token, raise_on_unexpected_status=True) as client:
        body = models.CreateContainer(
            claim_id=claim(), image=test_image, command=["sleep", "300"],
            port_mappings=[models.PortMapping(host_port=port, container_port=8080)],
        )
        created = create.sync(client=client, body=body)
        assert isinstance(created, models.Created) and len(created.container_id) == 64

        again = create.sync_detailed(client=client, body=body)
        assert again.status_code == 409 and isinstance(again.parsed, models.Error)
        assert again.parsed.error is models.ErrorError.CLAIM_EXISTS

        [listed] = list_containers.sync(client=client, claim_id=claim())
        assert isinstance(listed, models.Container) and listed.id == created.container_id
        assert listed.status is models.ContainerStatus.RUNNING
        assert listed.ports.additional_properties == {"8080/tcp": str(port)}

        shown = get_container.sync(container_id=created.container_id[:12], client=client)
        assert isinstance(shown, models.Container) and shown.to_dict() == listed.to_dict()
        assert shown.created <= shown.started and shown.gpu_ids == []

        metrics = get_node_metrics.sync(client=client)
        assert isinstance(metrics, models.Metrics) and len(metrics.gpus) == 8

        assert delete_container.sync_detailed(container_id=created.container_id, client=client).status_code == 204
        gone = get_container.sync_detailed(container_id=created.container_id, client=client)
        assert gone.status_code == 404 and gone.parsed.error is models.ErrorError.NOT_FOUND
        assert list_containers.sync(client=client, claim_id=claim()) == []
