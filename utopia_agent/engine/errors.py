"""One map from the engine's failures to the agent's errors, for every engine call.

docker-py raises its own exceptions (and requests' and the socket's); `engine_errors` turns
each into a domain error that names what was attempted, so nothing above the engine layer
ever sees an engine exception. The engine's own answers (404, 409, other 4xx, 5xx) keep the
engine's reason, so a caller can turn one into something better (see DockerManager.start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import requests
import urllib3
from docker.errors import APIError, DockerException, NotFound

from ..errors import AgentError, Conflict, EngineError, EngineUnavailable, NotManaged

log = logging.getLogger("utopia_agent.docker")


@contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Translate engine failures into domain errors for one call, naming what was attempted."""
    try:
        yield
    except AgentError:
        raise
    except NotFound as exc:
        raise EngineNotFound(str(exc.explanation or exc)) from None
    except APIError as exc:
        status = exc.status_code or 500
        reason = str(exc.explanation or f"HTTP {status}")
        if status == 409:
            raise EngineConflict(reason) from None
        if status < 500:
            raise EngineRefusal(reason) from None
        log.warning("engine failed during %s: HTTP %d %s", what, status, reason)
        raise EngineFailure(f"the Docker engine failed ({what}): {reason}", reason) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, DockerException, OSError) as exc:
        reason = "timed out" if is_timeout(exc) else "unreachable"
        log.warning("engine %s during %s: %s", reason, what, type(exc).__name__)
        raise EngineUnavailable(f"the Docker engine is {reason} ({what})") from None


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc).lower()


class EngineAnswer:
    """An engine's error answer; `reason` is the engine's own text."""

    @property
    def reason(self) -> str:
        return self.message


class EngineNotFound(EngineAnswer, NotManaged):
    """The engine has no such object; as an answer, the same 404 as an unmanaged id."""


class EngineConflict(EngineAnswer, Conflict):
    """The engine refused with 409 (a name in use, mostly)."""


class EngineRefusal(EngineAnswer, EngineError):
    """The engine refused the request with a 4xx: a 502 unless the caller turns it into something
    better (create and start make it the caller's 400, an ambiguous id prefix is a 404)."""


class EngineFailure(EngineError):
    """The engine failed with a 5xx: a 502 that names what was attempted and the engine's reason."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason
