"""GET /openapi.json: the OpenAPI 3 document, written from the app's URL map and each route's
declaration (api/operations.py), so it lists exactly the routes the app serves."""

from __future__ import annotations

import re
from collections.abc import Iterator

from flask import Blueprint, Flask, current_app
from werkzeug.routing import Rule

from .. import __version__
from ..schemas import CONTAINER_EXAMPLE, ContainerSchema, ErrorSchema
from . import api_v1
from .operations import Failure, Operation, Responds, Routes, encoded_response, json_body

blueprint = Blueprint("openapi", __name__)
routes = Routes(blueprint, tag="service")

TAGS = [
    {"name": "containers", "description": "The containers of claims: create, list, show, stop, start, delete."},
    {"name": "node", "description": "The node's CPU, memory, disk and GPU figures, as JSON and for Prometheus."},
    {"name": "gpus", "description": "Each GPU's state, and the operator's quarantine."},
    {"name": "images", "description": "The node's images: list, pull ahead, remove; the pulls in flight."},
    {"name": "volumes", "description": "Claim volumes: node-local volumes of a hard size, kept past the claims that mount them."},
    {"name": "events", "description": "The node's changes as a stream: containers, GPUs, volumes, the drain."},
    {"name": "service", "description": "Liveness and this document; no token needed."},
]
EXAMPLES = {ContainerSchema: CONTAINER_EXAMPLE}
# A route that may need the token may answer this.
# Flask answers these for every route by itself.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
# A schemaless body, by its content type.
FREE_FORM = {"application/json": {"type": "object"}, "text/plain": {"type": "string"}, "application/x-ndjson": {"type": "string"}}


def openapi_path(rule: Rule) -> str:
    """`/containers/<container_id>` as OpenAPI writes it: `/containers/{container_id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)


def declared_routes(app: Flask) -> Iterator[tuple[Rule, str, Operation]]:
    """Every route and method the app serves, with its declaration; a route without one is a mistake."""
    for rule in app.url_map.iter_rules():
        declared: Operation | None = getattr(app.view_functions[rule.endpoint], "operation", None)
        if declared is None:
            raise LookupError(f"route {rule.rule} ({rule.endpoint}) has no declaration: see utopia_agent/api/operations.py")
        documented = set(declared.path.fields) if declared.path is not None else set()
        if documented != set(rule.arguments):
            raise LookupError(f"route {rule.rule} has path parameters {sorted(rule.arguments)}, its declaration {sorted(documented)}")
        for method in sorted(rule.methods - IMPLICIT_METHODS):
            yield rule, method.lower(), declared


def security_of(rule: Rule, declared: Operation) -> tuple[dict[str, list], ...]:
    if declared.security is not None:
        return declared.security
    return api_v1.SECURITY if rule.endpoint.startswith(f"{api_v1.blueprint.name}.") else ()


def success(response: Responds) -> dict:
    described: dict = {"description": response.description}
    if response.content_type is not None:
        schema = response.schema if response.schema is not None else FREE_FORM[response.content_type]
        described["content"] = {response.content_type: {"schema": schema}}
    return described


def failure(failed: list[Failure]) -> dict:
    """One status's response: the failures that answer it (a route's own 403 and the read-only token's), each with its codes."""
    described = " ".join(f"{one.description} (`error`: {', '.join(f'`{error.code}`' for error in one.errors)})" for one in failed)
    return {"description": described, "content": {"application/json": {"schema": ErrorSchema}}}


def describe_operation(declared: Operation, method: str, security: tuple[dict[str, list], ...]) -> dict:
    described: dict = {"operationId": declared.operation_id, "tags": [declared.tag], "summary": declared.summary}
    if declared.description:
        described["description"] = declared.description
    if security:
        described["security"] = list(security)
    parameters = [{"in": place, "schema": schema} for place, schema in (("path", declared.path), ("query", declared.query)) if schema is not None]
    if parameters:
        described["parameters"] = parameters
    if declared.body is not None:
        described["requestBody"] = {"required": True, "content": {"application/json": {"schema": declared.body}}}
    failures: dict[int, list[Failure]] = {}
    for failed in declared.all_failures(any("bearer" in requirement for requirement in security), method):
        failures.setdefault(failed.status, []).append(failed)
    responses = {response.status: success(response) for response in declared.responses}
    responses.update((status, failure(failed)) for status, failed in failures.items())
    described["responses"] = {str(status): responses[status] for status in sorted(responses)}
    return described


def describe_api(app: Flask) -> dict:
    """The whole document, from the app's routes and their declarations."""
    # Imported here: a worker loads apispec (about 1 MiB) only if asked for the document, once.
    from apispec import APISpec
    from apispec.ext.marshmallow import MarshmallowPlugin

    spec = APISpec(
        title="Utopia node agent",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Starts Docker containers with exclusive GPUs for claims, and reports node metrics."},
        tags=TAGS,
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("Error", schema=ErrorSchema)
    for schema, example in EXAMPLES.items():
        spec.components.schema(schema.__name__.removesuffix("Schema"), component={"example": example}, schema=schema)
    paths: dict[str, dict[str, dict]] = {}
    for rule, method, declared in declared_routes(app):
        paths.setdefault(openapi_path(rule), {})[method] = describe_operation(declared, method, security_of(rule, declared))
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


@routes.get("/openapi.json", "getOpenApiDocument", summary="This document; no auth", responds=Responds(200, "OpenAPI 3."))
def openapi_document():
    """Written and encoded once per process: the routes and schemas do not change at run time."""
    body = current_app.extensions.get("openapi")
    if body is None:
        body = current_app.extensions["openapi"] = json_body(describe_api(current_app))
    return encoded_response(body)
