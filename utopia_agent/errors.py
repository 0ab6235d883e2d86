"""Domain errors: each fixes its status, its stable `error` code and the fields of its body.

No Flask here, so the client (utopia_agent.client) loads the schemas without the server;
api/error_handlers.py is the one place where an error becomes a JSON response."""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base of every error the agent answers on purpose; subclasses fix the status."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(AgentError):
    """The request does not fit the schema; `errors` holds per-field messages."""

    status = 400
    code = "invalid_request"


class PolicyViolation(AgentError):
    """The request is well formed but the node's policy forbids it."""

    status = 403
    code = "forbidden_by_policy"


class Unauthorized(AgentError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="utopia-agent"'}


class ReadOnlyToken(AgentError):
    """The read-only token (UTOPIA_AGENT_READ_TOKEN) was sent with a method that could change something."""

    status = 403
    code = "read_only_token"


class NotFound(AgentError):
    """No such route."""

    status = 404
    code = "not_found"


class NotManaged(NotFound):
    """Unknown id, or a container this agent does not manage (which it never touches)."""


class MethodNotAllowed(AgentError):
    """The route exists, but not with this method; `Allow` names the ones it has."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]):
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class BodyTooLarge(AgentError):
    """The body is larger than UTOPIA_AGENT_MAX_BODY_BYTES; the message names the limit."""

    status = 413
    code = "body_too_large"

    @classmethod
    def over(cls, max_body_bytes: int) -> BodyTooLarge:
        return cls(
            f"the body is larger than {max_body_bytes} bytes, this node's UTOPIA_AGENT_MAX_BODY_BYTES",
            max_body_bytes=max_body_bytes,
        )


class Conflict(AgentError):
    status = 409
    code = "conflict"


class ClaimExists(Conflict):
    """The claim already has a container; the body names it, so a retrying caller learns it."""

    code = "claim_exists"

    @classmethod
    def held_by(cls, claim_id: str, container_id: str | None, same_spec: bool) -> ClaimExists:
        """`same_spec`: whether that container was made from the very request now asked (its spec digest)."""
        return cls(f"claim {claim_id} already has a container", claim_id=claim_id, container_id=container_id, same_spec=same_spec)


class NoGpusFree(Conflict):
    code = "no_gpus_free"


class NodeDraining(Conflict):
    """The operator drains the node: no new claims until it resumes; the body gives the reason."""

    code = "node_draining"


class GpuHeld(Conflict):
    """A quarantine cannot be released while a claim holds the GPU; the body names the claim."""

    code = "gpu_held"


class GpuNotFound(AgentError):
    status = 404
    code = "gpu_not_found"


class PortTaken(Conflict):
    code = "port_taken"


class NotEnoughResources(Conflict):
    """The claim's CPUs, memory or disk exceed what is free on the node; the body names what is."""

    code = "not_enough_resources"


class TooManyFollowers(AgentError):
    """This worker already streams as many logs as it may, so probes always find a free thread."""

    status = 429
    code = "too_many_followers"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class TooManyStreams(AgentError):
    """The agent already serves as many event streams as it may, so other requests always find a thread."""

    status = 429
    code = "too_many_streams"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class RevisionTooOld(AgentError):
    """The history no longer holds the changes after the asked revision: list again, then watch."""

    status = 410
    code = "revision_too_old"


class ImagePullFailed(AgentError):
    """The registry or the network failed, or the pull stalled; the message carries the reason.
    Worth retrying."""

    status = 502
    code = "image_pull_failed"


class ImageUnavailable(AgentError):
    """The registry refused the credentials given (or none were given for an image private on
    this node), or has no such repository or tag; not worth retrying as is."""

    status = 400
    code = "image_unavailable"


class InsufficientStorage(AgentError):
    """The node's image store has no room for the pull, even after collecting unused images."""

    status = 507
    code = "insufficient_storage"


class ImageInUse(Conflict):
    """An image a container was made from (running or not) is never removed."""

    code = "image_in_use"


class EngineRejected(AgentError):
    """The engine refused the container as configured (a bad command, say)."""

    status = 400
    code = "engine_rejected"


class NodeFault(AgentError):
    """The node itself failed the request (say, the agent may not mount); not the caller's fault."""

    status = 500
    code = "node_fault"


class EngineError(AgentError):
    """The engine answered with a failure of its own."""

    status = 502
    code = "engine_error"


class EngineUnavailable(AgentError):
    """The Docker engine did not answer in time; the caller should retry later."""

    status = 503
    code = "engine_unavailable"
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class NvmlHung(AgentError):
    """An NVML call has not returned within UTOPIA_AGENT_NVML_TIMEOUT: GPUs cannot be judged now."""

    status = 503
    code = "nvml_hung"
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class NetworkUnprotected(AgentError):
    """The claims' network isolation is not in place (rules gone and not restored, or the network
    not made): no claim is started unprotected."""

    status = 503
    code = "network_unprotected"
    retry_after_seconds = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class AllocationBusy(EngineUnavailable):
    """Other creates held the node's allocation lock for too long; retry shortly."""

    code = "allocation_busy"
    retry_after_seconds = 1


def error_codes() -> list[str]:
    """Every `error` code the agent answers with, from the classes above (the OpenAPI enum)."""
    codes, pending = set(), [AgentError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return sorted(codes)
