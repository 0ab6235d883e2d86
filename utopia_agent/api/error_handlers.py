"""The one place where an error becomes a JSON response; never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask
from werkzeug.exceptions import HTTPException

from ..errors import NO_SPACE, AgentError, BodyTooLarge, InsufficientStorage, InvalidRequest, MethodNotAllowed, NotFound
from ..schemas import ErrorSchema
from .operations import json_response

log = logging.getLogger("utopia_agent.errors")
ERROR_BODY = ErrorSchema()


def from_http_exception(error: HTTPException, max_body_bytes: int) -> AgentError:
    """Werkzeug's own refusals (unknown route, wrong method, body too large) as our errors."""
    if error.code == 404:
        return NotFound("no such route; see /openapi.json")
    if error.code == 405:
        return MethodNotAllowed(error.description, list(error.valid_methods or []))
    if error.code == 413:
        return BodyTooLarge.over(max_body_bytes)
    if error.code is not None and 400 <= error.code < 500:
        refused = InvalidRequest(error.description)
        refused.status = error.code
        return refused
    return AgentError("internal error; see the agent's log")


def error_response(error: AgentError):
    response = json_response(ERROR_BODY.dump(error.body()), error.status)
    response.headers.update(error.headers())
    return response


def register_error_handlers(app: Flask) -> None:
    """Turn domain errors, HTTP errors and surprises into JSON bodies; never a stack trace."""

    @app.errorhandler(AgentError)
    def handle_agent_error(error: AgentError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException):
        return error_response(from_http_exception(error, app.config["MAX_CONTENT_LENGTH"]))

    @app.errorhandler(OSError)
    def handle_os_error(error: OSError):
        """A write of the agent's own that found no room: each leaves its previous state whole
        (node/state_file.py, events/history.py), so the request failed as a whole."""
        if error.errno in NO_SPACE:
            state_dir = str(app.extensions["utopia"].config.state_dir)
            log.warning("no room in the state dir %s: %s", state_dir, error.strerror)
            return error_response(InsufficientStorage.state_dir_full(state_dir, error.strerror))
        return handle_unexpected(error)

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        log.exception("unhandled error: %s", type(error).__name__)
        return error_response(AgentError("internal error; see the agent's log"))
