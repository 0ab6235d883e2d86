"""The one place where an error becomes a JSON response; never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import AgentError

log = logging.getLogger("utopia_agent.errors")


def error_response(error: AgentError):
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers())
    return response


def register_error_handlers(app: Flask) -> None:
    """Turn domain errors, HTTP errors and surprises into JSON bodies; never a stack trace."""

    @app.errorhandler(AgentError)
    def handle_agent_error(error: AgentError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException):
        response = jsonify({"error": error.name.lower().replace(" ", "_"), "message": error.description})
        response.status_code = error.code or 500
        if error.code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        log.exception("unhandled error: %s", type(error).__name__)
        return error_response(AgentError("internal error; see the agent's log"))
