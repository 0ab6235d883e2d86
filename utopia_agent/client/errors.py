"""Every error the agent answers, as its own class carrying the body's fields (see `ApiError`).

The classes come from the server's table of codes (utopia_agent/errors.py ERROR_CODES): a class per
row, named in its `client` column, its fields as properties."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import requests
from marshmallow import INCLUDE, ValidationError

from ..errors import ERROR_CODES
from ..schemas import ErrorSchema


class AgentClientError(Exception):
    """Anything this client raises."""


class AgentUnreachable(AgentClientError):
    """No answer: the connection failed or timed out. A create or delete may still have happened."""


class UnexpectedAnswer(AgentClientError):
    """The agent answered something that does not fit the contract (a proxy's page, say)."""


class ApiError(AgentClientError):
    """The agent answered an error: `status`, the stable `code`, `message` and the whole `body`.

    Subclasses stand for one `error` code each (the server's utopia_agent/errors.py classes);
    a code this client does not know is raised as the class of its HTTP status.
    `retryable` says whether sending the same request later may succeed.
    """

    status: ClassVar[int] = 0
    code: ClassVar[str] = ""
    retryable: ClassVar[bool] = False

    def __init__(self, status: int, body: dict[str, Any], request_id: str | None = None, retry_after: float | None = None):
        self.status_code = status
        self.body = body
        self.error = body.get("error", "")
        self.message = body.get("message", "")
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(f"{status} {self.error}: {self.message}")


def _field(name: str) -> property:
    """The body's field `name` (None from an agent that does not send it); `errors` is a map even then."""
    if name == "errors":
        return property(lambda error: error.body.get(name) or {})
    return property(lambda error: error.body.get(name))


def _client_classes() -> dict[str, type[ApiError]]:
    """One class per row of the server's table of codes, under the same family, with its fields as properties."""
    classes: dict[str, type[ApiError]] = {}
    for row in ERROR_CODES:
        namespace: dict[str, Any] = {name: _field(name) for name in row.fields}
        namespace.update(__doc__=row.doc, __module__=__name__, status=row.status, code=row.code, retryable=row.retry_after is not None)
        classes[row.code] = type(row.client, (classes[row.family] if row.family else ApiError,), namespace)
    return classes


ERRORS_BY_CODE: dict[str, type[ApiError]] = _client_classes()
globals().update({cls.__name__: cls for cls in ERRORS_BY_CODE.values()})
# A code this client does not know is raised as the most general class of its status.
ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    ERRORS_BY_CODE[code].status: ERRORS_BY_CODE[code]
    for code in ("invalid_request", "unauthorized", "forbidden_by_policy", "not_found", "method_not_allowed", "conflict",
                 "body_too_large", "too_many_followers", "internal_error", "engine_error", "engine_unavailable")
}


def retry_after_seconds(response: requests.Response) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_from_response(response: requests.Response) -> ApiError:
    """The ApiError subclass for an error answer, its body loaded through the server's ErrorSchema."""
    try:
        raw = response.json()
        body = ErrorSchema().load(raw, unknown=INCLUDE) if isinstance(raw, dict) else {}
    except ValidationError as invalid:
        # A code newer than this client's schema knows is still an error of its status, with its fields.
        body = dict(raw) if set(invalid.messages) == {"error"} and isinstance(raw.get("error"), str) else {}
    except ValueError:
        body = {}
    if not body:
        body = {"error": f"http_{response.status_code}", "message": response.text[:300] or response.reason or ""}
    cls = ERRORS_BY_CODE.get(body["error"])
    if cls is None or cls.status != response.status_code:
        cls = ERRORS_BY_STATUS.get(response.status_code, ApiError)
    return cls(response.status_code, body, response.headers.get("X-Request-ID"), retry_after_seconds(response))
