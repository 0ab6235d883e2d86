"""Request ids and the one log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from flask import Flask, g, request

from .prometheus import REQUEST_DURATION

log = logging.getLogger("utopia_agent.requests")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
_REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")
_ID, _STARTED_AT = "utopia_agent.request_id", "utopia_agent.started_at"


def register_request_hooks(app: Flask) -> None:
    """Give every request an id (the caller's, when it is sane) and log it once answered.

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
        duration = time.monotonic() - environ.get(_STARTED_AT, time.monotonic())
        route = answered.url_rule.rule if answered.url_rule else "unmatched"
        answer = Answered(request_id, answered.method, route, response.status_code, duration, g.get("claim_id"))
        # The server calls this once the answer is written out: the caller does not wait on the log.
        response.call_on_close(answer.record)
        return response


@dataclass(frozen=True, slots=True)
class Answered:
    """What the request's log line and its duration histogram say, taken when its answer was made."""

    request_id: str
    method: str
    route: str
    status: int
    duration: float
    claim_id: str | None

    def record(self) -> None:
        REQUEST_DURATION.labels(self.route, self.method, str(self.status)).observe(self.duration)
        duration_ms = self.duration * 1000
        log.info(
            "%s %s %d %.1fms",
            self.method,
            self.route,
            self.status,
            duration_ms,
            extra={
                "request_id": self.request_id,
                "method": self.method,
                "route": self.route,
                "status": self.status,
                "duration_ms": round(duration_ms, 2),
                "claim_id": self.claim_id,
            },
        )
