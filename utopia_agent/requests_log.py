"""Request ids and the one log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, g, request

from .prometheus import REQUEST_DURATION

log = logging.getLogger("utopia_agent.requests")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
_REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")
_ID, _STARTED_AT = "utopia_agent.request_id", "utopia_agent.started_at"


def register_request_hooks(app: Flask) -> None:
    """Give every request an id (the caller's, when it is sane) and log it when answered.

    These run on every request, /health probes included, so they read the request once and keep
    what they need in its WSGI environ rather than going through Flask's proxies again."""

    @app.before_request
    def assign_request_id():
        environ = request.environ
        given = environ.get(_REQUEST_ID_ENVIRON, "")
        environ[_ID] = given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        environ[_STARTED_AT] = time.monotonic()

    @app.after_request
    def log_request(response):
        answered = request._get_current_object()
        environ = answered.environ
        request_id = environ.get(_ID) or uuid.uuid4().hex
        response.headers[REQUEST_ID_HEADER] = request_id
        route = answered.url_rule.rule if answered.url_rule else "unmatched"
        method, status = answered.method, response.status_code
        duration = time.monotonic() - environ.get(_STARTED_AT, time.monotonic())
        REQUEST_DURATION.labels(route, method, str(status)).observe(duration)
        duration_ms = duration * 1000
        log.info(
            "%s %s %d %.1fms",
            method,
            route,
            status,
            duration_ms,
            extra={
                "request_id": request_id,
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(duration_ms, 2),
                "claim_id": g.get("claim_id"),
            },
        )
        return response
