"""Each route's declaration: the schemas of its path, query and body, its responses, and the errors it may answer.

A blueprint's `Routes` registers each view with its declaration; `operation` wraps the view so
the declared schemas load its request and dump its response, and api/openapi.py writes the
document from the same declarations and the app's URL map: the document cannot describe a
route the app lacks, nor a shape the route does not answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from flask import Blueprint, Response, current_app, request
from marshmallow import Schema

from ..errors import AgentError, AllocationBusy, BodyTooLarge, EngineError, EngineUnavailable, InsufficientStorage, ReadOnlyToken, Unauthorized
from ..schemas import load_query
from .auth import READ_METHODS
from .bodies import load_body


@dataclass(frozen=True)
class Failure:
    """Error responses of one status: the error classes fix the status and the `error` codes,
    the description says when this operation answers them."""

    description: str
    errors: tuple[type[AgentError], ...]

    @property
    def status(self) -> int:
        return self.errors[0].status


def fails(description: str, *errors: type[AgentError]) -> Failure:
    statuses = {error.status for error in errors}
    if len(statuses) != 1:
        raise ValueError(f"one status per response, got {statuses}")
    return Failure(description, errors)


# Bodies as Flask's JSON provider writes them outside debug (compact, ASCII, keys in the
# schema's order, a newline at the end), encoded without building a provider call per response.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def json_body(data: Any) -> bytes:
    return f"{_encode(data)}\n".encode()


def json_response(data: Any, status: int = 200) -> Response:
    return encoded_response(json_body(data), status)


def encoded_response(body: bytes, status: int = 200) -> Response:
    """A JSON body already encoded."""
    return current_app.response_class(body, status=status, mimetype="application/json")


# What every route that waits on the engine may answer.
ENGINE_DOWN = fails("The Docker engine is unreachable or slow; retry after Retry-After seconds.", EngineUnavailable)
# What a route that takes the allocation lock may answer instead.
LOCK_OR_ENGINE = fails("The Docker engine is unreachable or slow, or other requests held the allocation lock too long.", EngineUnavailable, AllocationBusy)
# What a route that lists the managed containers answers when the engine fails the list.
LIST_FAILED = fails("The engine failed to list the containers.", EngineError)
# What every route answers without a word in its declaration: behind the token, and with a body.
UNAUTHORIZED = fails("Missing, malformed or wrong bearer token.", Unauthorized)
READ_ONLY = fails("The read-only token (UTOPIA_AGENT_READ_TOKEN) sent with a method other than GET.", ReadOnlyToken)
BODY_TOO_LARGE = fails("The body is larger than the node's UTOPIA_AGENT_MAX_BODY_BYTES.", BodyTooLarge)
# What every route that may write answers when the state dir's filesystem is full (api/error_handlers.py).
STATE_DIR_FULL = fails("The agent's state dir has no room for a write this needs (`filesystem` names it); nothing was changed.",
                       InsufficientStorage)


@dataclass(frozen=True)
class Responds:
    """A success response: `schema` dumps its JSON body; without one the view writes the body
    itself, in `content_type` (None: no body at all)."""

    status: int
    description: str
    schema: Schema | None = None
    content_type: str | None = "application/json"


@dataclass(frozen=True)
class Reply:
    """A body with its status and headers, where the first declared status alone will not do."""

    body: Any
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """What a route takes and answers: api/openapi.py documents it, `operation` enforces it."""

    operation_id: str
    tag: str
    summary: str
    responses: tuple[Responds, ...]
    failures: tuple[Failure, ...] = ()
    path: Schema | None = None
    query: Schema | None = None
    body: Schema | None = None
    description: str | None = None
    # None: the security of the route's blueprint (the bearer token under /api/v1, else none).
    security: tuple[dict[str, list], ...] | None = None

    def all_failures(self, behind_token: bool, method: str) -> tuple[Failure, ...]:
        """Its declared failures, and those that come with its kind of route: 401 behind the token,
        403 for the read-only token and 507 for a full state dir on a method that is not a read, 413
        where it takes a body (Flask refuses an oversized body before the view runs)."""
        implied = (UNAUTHORIZED,) if behind_token else ()
        if behind_token and method.upper() not in READ_METHODS:
            implied += (READ_ONLY,)
            if not any(failure.status == STATE_DIR_FULL.status for failure in self.failures):
                implied += (STATE_DIR_FULL,)
        if self.body is not None:
            implied += (BODY_TOO_LARGE,)
        return self.failures + implied

    def respond(self, result: Any) -> Response:
        """The view's result as a response: a Response as it is (a stream, a cached body), else the
        body, or a Reply, dumped by the schema declared for its status."""
        if isinstance(result, Response):
            return result
        reply = result if isinstance(result, Reply) else Reply(result, self.responses[0].status)
        result, status, headers = reply.body, reply.status, reply.headers
        declared = next((response for response in self.responses if response.status == status), None)
        if declared is None:
            raise LookupError(f"{self.operation_id} answered {status}, which it does not declare")
        if declared.schema is None:
            response = current_app.response_class(status=status)
        else:
            response = json_response(declared.schema.dump(result), status)
        response.headers.update(headers)
        return response


def operation(operation_id: str, *, tag: str, summary: str, responds: Responds | tuple[Responds, ...], **declared: Any) -> Callable:
    """Declare a view (see Operation); the view gets the loaded `query` and `body` as keyword arguments."""
    declaration = Operation(operation_id, tag, summary, responds if isinstance(responds, tuple) else (responds,), **declared)

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def declared_view(**arguments: Any) -> Response:
            if declaration.query is not None:
                arguments["query"] = load_query(declaration.query, request.args)
            if declaration.body is not None:
                arguments["body"] = load_body(declaration.body)
            return declaration.respond(view(**arguments))

        declared_view.operation = declaration
        return declared_view

    return decorate


class Routes:
    """One blueprint's routes, each declared as `operation` declares it, with what they share said
    once: the blueprint, the OpenAPI tag, and the schema of the rules' variables (`path`, declared
    for every route whose rule has any)."""

    def __init__(self, blueprint: Blueprint, tag: str, path: Schema | None = None):
        self.blueprint = blueprint
        self._tag = tag
        self._path = path

    def get(self, rule: str, operation_id: str, **declared: Any) -> Callable:
        return self.route("GET", rule, operation_id, **declared)

    def post(self, rule: str, operation_id: str, **declared: Any) -> Callable:
        return self.route("POST", rule, operation_id, **declared)

    def delete(self, rule: str, operation_id: str, **declared: Any) -> Callable:
        return self.route("DELETE", rule, operation_id, **declared)

    def route(self, method: str, rule: str, operation_id: str, *, websocket: bool = False, wrapped_by: Callable | None = None,
              **declared: Any) -> Callable:
        """`wrapped_by` goes around the declared view, so it also sees what the declaration refuses (a body that does not load)."""
        if self._path is not None and "<" in rule:
            declared.setdefault("path", self._path)
        declare = operation(operation_id, tag=self._tag, **declared)

        def decorate(view: Callable) -> Callable:
            declared_view = declare(view)
            if wrapped_by is not None:
                declared_view = wrapped_by(declared_view)
            self.blueprint.route(rule, methods=[method], websocket=websocket)(declared_view)
            return declared_view

        return decorate


class RenderedWhileSame:
    """JSON bodies dumped by `schema`, each kept while the view gives the very same object for its
    key: each container is one object while the view does not change it (see DockerManager), so it
    is dumped once per change, shown alone or in a list; and the whole list is one tuple per
    node-view generation, so a list is joined once per change from what is kept (right after a
    change only the containers that changed are dumped: 1.0 ms of dumping at 100 containers)."""

    # Bodies of containers long gone are dropped all at once past this many.
    MAX_KEPT = 4096

    def __init__(self, schema: Schema):
        self._schema = schema
        self._rendered: dict[Hashable, tuple[object, bytes]] = {}
        self._listed: tuple[object, bytes] = (None, b"")

    def _encoded(self, obj: object, key: Hashable) -> bytes:
        kept = self._rendered.get(key)
        if kept is None or kept[0] is not obj:
            if len(self._rendered) >= self.MAX_KEPT:
                self._rendered.clear()
            kept = self._rendered[key] = (obj, _encode(self._schema.dump(obj)).encode())
        return kept[1]

    def response(self, obj: object, key: Hashable = None) -> Response:
        return encoded_response(self._encoded(obj, key) + b"\n")

    def list_response(self, objs: Sequence[Any], key: Callable[[Any], Hashable]) -> Response:
        """The JSON array of `objs`, as `schema` with many=True would dump it."""
        listed, body = self._listed
        if listed is not objs:
            body = b"[" + b",".join(self._encoded(obj, key(obj)) for obj in objs) + b"]\n"
            self._listed = (objs, body)
        return encoded_response(body)
