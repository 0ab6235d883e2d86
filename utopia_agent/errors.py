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


class NotManaged(AgentError):
    """Unknown id, or a container this agent does not manage (which it never touches)."""

    status = 404
    code = "not_found"


class Conflict(AgentError):
    status = 409
    code = "conflict"


class ClaimExists(Conflict):
    """The claim already has a container; the body names it, so a retrying caller learns it."""

    code = "claim_exists"

    @classmethod
    def held_by(cls, claim_id: str, container_id: str | None) -> "ClaimExists":
        return cls(f"claim {claim_id} already has a container", claim_id=claim_id, container_id=container_id)


class NoGpusFree(Conflict):
    code = "no_gpus_free"


class PortTaken(Conflict):
    code = "port_taken"


class ImagePullFailed(AgentError):
    """The registry refused or never delivered the image; the message carries its reason."""

    status = 502
    code = "image_pull_failed"


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


class AllocationBusy(EngineUnavailable):
    """Other creates held the node's allocation lock for too long; retry shortly."""

    code = "allocation_busy"
    retry_after_seconds = 1
