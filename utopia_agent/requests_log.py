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


def register_request_hooks(app: Flask) -> None:
    """Give every request an id (the caller's, when it is sane) and log it when answered."""

    @app.before_request
    def assign_request_id():
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        g.started_at = time.monotonic()

    @app.after_request
    def log_request(response):
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers[REQUEST_ID_HEADER] = request_id
        route = request.url_rule.rule if request.url_rule else "unmatched"
        duration_ms = (time.monotonic() - g.get("started_at", time.monotonic())) * 1000
        REQUEST_DURATION.labels(route, request.method, str(response.status_code)).observe(duration_ms / 1000)
        log.info(
            "%s %s %d %.1fms",
            request.method,
            route,
            response.status_code,
            duration_ms,
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(duration_ms, 2),
                "claim_id": g.get("claim_id"),
            },
        )
        return response
