"""Every error the agent answers, as its own class carrying the body's fields (see `ApiError`)."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import requests
from marshmallow import INCLUDE, ValidationError

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


class InvalidRequest(ApiError):
    """The body or query does not fit the schema; `errors` maps each field to its messages. Fix, do not retry."""

    status, code = 400, "invalid_request"

    @property
    def errors(self) -> dict[str, Any]:
        return self.body.get("errors") or {}


class EngineRejected(ApiError):
    """The engine refused the container as asked (a command that does not exist, say). Fix, do not retry."""

    status, code = 400, "engine_rejected"


class Unauthorized(ApiError):
    """Missing or wrong token."""

    status, code = 401, "unauthorized"


class ForbiddenByPolicy(ApiError):
    """The node's policy forbids the request (a volume, port or env var, or the image's labels)."""

    status, code = 403, "forbidden_by_policy"


class ReadOnlyToken(ApiError):
    """The client holds the read-only token (UTOPIA_AGENT_READ_TOKEN) and asked for a change."""

    status, code = 403, "read_only_token"


class NotFound(ApiError):
    """No managed container (or GPU, or route) of that id."""

    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    """The node's state refuses the request now; it may succeed once that state changes."""

    status, code = 409, "conflict"


class ClaimExists(Conflict):
    """The claim already has a container: `container_id` names it (None if it went away meanwhile)."""

    code = "claim_exists"

    @property
    def claim_id(self) -> str | None:
        return self.body.get("claim_id")

    @property
    def container_id(self) -> str | None:
        return self.body.get("container_id")

    @property
    def same_spec(self) -> bool | None:
        """Whether that container was made from the very request refused (None from an agent that does not say)."""
        return self.body.get("same_spec")


class NoGpusFree(Conflict):
    """Fewer healthy free GPUs than asked: `requested` and `free_gpus` say how many."""

    code = "no_gpus_free"

    @property
    def requested(self) -> int | None:
        return self.body.get("requested")

    @property
    def free_gpus(self) -> int | None:
        return self.body.get("free_gpus")


class PortTaken(Conflict):
    """A host port is held by another claim or process: `host_port` names it."""

    code = "port_taken"

    @property
    def host_port(self) -> int | None:
        return self.body.get("host_port")


class NodeDraining(Conflict):
    """The node is draining: it takes no new claims until an operator resumes it."""

    code = "node_draining"


class GpuHeld(Conflict):
    """A GPU's quarantine cannot be released while a claim holds it: `claim_id` names the claim."""

    code = "gpu_held"

    @property
    def claim_id(self) -> str | None:
        return self.body.get("claim_id")


class NotEnoughResources(Conflict):
    """The claim's CPUs, memory or disk exceed what is free: `free_cpus`, `free_memory_mb` or `free_disk_gb` say what is."""

    code = "not_enough_resources"

    @property
    def free_cpus(self) -> float | None:
        return self.body.get("free_cpus")

    @property
    def free_memory_mb(self) -> int | None:
        return self.body.get("free_memory_mb")

    @property
    def free_disk_gb(self) -> float | None:
        return self.body.get("free_disk_gb")


class GpuNotFound(NotFound):
    """No GPU of that UUID on the node."""

    code = "gpu_not_found"


class BodyTooLarge(ApiError):
    status, code = 413, "body_too_large"


class TooManyFollowers(ApiError):
    """This worker already streams as many followed logs as it may; retry after Retry-After."""

    status, code, retryable = 429, "too_many_followers", True


class TooManyStreams(ApiError):
    """The agent already serves as many event streams as it may; retry after Retry-After."""

    status, code, retryable = 429, "too_many_streams", True


class RevisionTooOld(ApiError):
    """The agent no longer holds the changes after the asked revision: list again, watch from the list's."""

    status, code = 410, "revision_too_old"


class InternalError(ApiError):
    status, code = 500, "internal_error"


class NodeFault(ApiError):
    """The node itself failed the request (not the caller's fault): tell its operator."""

    status, code = 500, "node_fault"


class ImagePullFailed(ApiError):
    """The registry or the network failed, or the pull of `image` stalled; worth retrying."""

    status, code = 502, "image_pull_failed"

    @property
    def image(self) -> str | None:
        return self.body.get("image")


class ImageUnavailable(ApiError):
    """The registry refused `image`: wrong or missing credentials, or no such repository or tag."""

    status, code = 400, "image_unavailable"

    @property
    def image(self) -> str | None:
        return self.body.get("image")


class InsufficientStorage(ApiError):
    """The node's image store has no room for the pull, even after collecting unused images."""

    status, code = 507, "insufficient_storage"


class ImageInUse(Conflict):
    """A container, running or not, was made from the image; it is not removed."""

    status, code = 409, "image_in_use"


class EngineError(ApiError):
    """The engine failed the call; the state is unknown until a later read."""

    status, code = 502, "engine_error"


class EngineUnavailable(ApiError):
    """The engine did not answer in time; nothing was done. Raised once the retries are spent."""

    status, code, retryable = 503, "engine_unavailable", True


class NvmlHung(EngineUnavailable):
    """NVML does not answer on the node, so GPUs cannot be given now; nothing was done."""

    code = "nvml_hung"


class NetworkUnprotected(EngineUnavailable):
    """The node cannot isolate claims now (its firewall rules or network are missing); nothing was done."""

    code = "network_unprotected"


class AllocationBusy(EngineUnavailable):
    """Other creates held the node's allocation lock too long; nothing was done."""

    code = "allocation_busy"


def _error_classes() -> list[type[ApiError]]:
    classes, pending = [], [ApiError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


ERRORS_BY_CODE: dict[str, type[ApiError]] = {cls.code: cls for cls in _error_classes() if cls.code}
# A code this client does not know is raised as the most general class of its status.
ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls
    for cls in (InvalidRequest, Unauthorized, ForbiddenByPolicy, NotFound, MethodNotAllowed, Conflict, BodyTooLarge,
                TooManyFollowers, InternalError, EngineError, EngineUnavailable)
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
