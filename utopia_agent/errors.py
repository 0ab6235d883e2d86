"""Domain errors: one table of `error` codes gives the server's classes (here) and the client's
(utopia_agent/client/errors.py), so the two cannot drift apart.

No Flask here, so the client (utopia_agent.client) loads the schemas without the server;
api/error_handlers.py is the one place where an error becomes a JSON response."""

from __future__ import annotations

import errno
from typing import Any, NamedTuple


class ErrorCode(NamedTuple):
    """One `error` code: its status, the class that stands for it on each side, and its body's fields."""

    status: int
    code: str
    server: str  # the class raised on the server (this module)
    client: str  # the class the client raises (utopia_agent.client)
    family: str | None  # the more general code this one is a case of: catching the family's class catches it
    fields: tuple[str, ...]  # the body's fields beside `error` and `message`
    retry_after: int | None  # seconds in Retry-After; the same request may succeed then (None: not worth retrying as is)
    doc: str


# A family's row comes before its cases.
ERROR_CODES: tuple[ErrorCode, ...] = (
    ErrorCode(500, "internal_error", "AgentError", "InternalError", None, (), None,
              "A bug (or a failure the agent did not expect); the agent's log has the details, the answer never a stack trace."),
    ErrorCode(400, "invalid_request", "InvalidRequest", "InvalidRequest", None, ("errors",), None,
              "The body or query does not fit the schema; `errors` maps each field to its messages. Fix, do not retry."),
    ErrorCode(400, "engine_rejected", "EngineRejected", "EngineRejected", None, (), None,
              "The engine refused the container as asked (a command that does not exist, say). Fix, do not retry."),
    ErrorCode(400, "image_unavailable", "ImageUnavailable", "ImageUnavailable", None, ("image",), None,
              "The registry refused `image`: wrong or missing credentials (or none given for an image private on this node), "
              "or no such repository or tag; not worth retrying as is."),
    ErrorCode(401, "unauthorized", "Unauthorized", "Unauthorized", None, (), None,
              "The token is missing, malformed or wrong."),
    ErrorCode(403, "forbidden_by_policy", "PolicyViolation", "ForbiddenByPolicy", None, ("errors",), None,
              "The request is well formed but the node's policy forbids it (a volume, port or env var, or the image's labels)."),
    ErrorCode(403, "read_only_token", "ReadOnlyToken", "ReadOnlyToken", None, (), None,
              "The read-only token (UTOPIA_AGENT_READ_TOKEN) came with a method that could change something."),
    ErrorCode(404, "not_found", "NotFound", "NotFound", None, (), None,
              "No managed container (or route) of that id."),
    ErrorCode(404, "gpu_not_found", "GpuNotFound", "GpuNotFound", "not_found", (), None,
              "No GPU of that UUID on the node."),
    ErrorCode(404, "volume_not_found", "VolumeNotFound", "VolumeNotFound", "not_found", ("volume",), None,
              "No claim volume of that name (or it is not whole: a create or delete was interrupted); `volume` names it."),
    ErrorCode(405, "method_not_allowed", "MethodNotAllowed", "MethodNotAllowed", None, (), None,
              "The route exists, but not with this method; `Allow` names the ones it has."),
    ErrorCode(409, "conflict", "Conflict", "Conflict", None, (), None,
              "The node's state refuses the request now; it may succeed once that state changes."),
    ErrorCode(409, "claim_exists", "ClaimExists", "ClaimExists", "conflict", ("claim_id", "container_id", "same_spec"), None,
              "The claim already has a container: `container_id` names it (None if it went away meanwhile), "
              "`same_spec` says whether it was made from the very request refused."),
    ErrorCode(409, "no_gpus_free", "NoGpusFree", "NoGpusFree", "conflict", ("requested", "free_gpus", "claim_id"), None,
              "Fewer healthy free GPUs than asked: `requested` and `free_gpus` say how many; for a start, `claim_id` names "
              "the claim that holds one of its GPUs now."),
    ErrorCode(409, "port_taken", "PortTaken", "PortTaken", "conflict", ("host_port",), None,
              "A host port is held by another claim or process: `host_port` names it."),
    ErrorCode(409, "not_enough_resources", "NotEnoughResources", "NotEnoughResources", "conflict",
              ("free_cpus", "free_memory_mb", "free_disk_gb", "claim_id"), None,
              "The claim's CPUs, memory or disk (or a volume's size) exceed what is free on the node: `free_cpus`, `free_memory_mb` "
              "or `free_disk_gb` say what is; for a start, `claim_id` names the claim that holds its exclusive CPUs now."),
    ErrorCode(409, "node_draining", "NodeDraining", "NodeDraining", "conflict", ("reason",), None,
              "The operator drains the node: no new claims until it resumes; `reason` says why."),
    ErrorCode(409, "gpu_held", "GpuHeld", "GpuHeld", "conflict", ("claim_id",), None,
              "A GPU's quarantine cannot be released while a claim holds it: `claim_id` names the claim."),
    ErrorCode(409, "volume_exists", "VolumeExists", "VolumeExists", "conflict", ("volume",), None,
              "A claim volume of that name exists."),
    ErrorCode(409, "volume_in_use", "VolumeInUse", "VolumeInUse", "conflict", ("volume", "claim_id"), None,
              "A claim (running or stopped) mounts the volume, read-write or, for a delete, at all: `claim_id` names it."),
    ErrorCode(409, "image_in_use", "ImageInUse", "ImageInUse", "conflict", (), None,
              "A container, running or not, was made from the image; it is never removed."),
    ErrorCode(409, "container_not_running", "ContainerNotRunning", "ContainerNotRunning", "conflict", (), None,
              "A command runs only in a running container (exec); wait for it to run again, or create a new one."),
    ErrorCode(410, "revision_too_old", "RevisionTooOld", "RevisionTooOld", None, ("revision",), None,
              "The history no longer holds the changes after the asked revision: list again, then watch from the list's."),
    ErrorCode(413, "body_too_large", "BodyTooLarge", "BodyTooLarge", None, ("max_body_bytes",), None,
              "The body is larger than the node's UTOPIA_AGENT_MAX_BODY_BYTES (`max_body_bytes`)."),
    ErrorCode(429, "too_many_followers", "TooManyFollowers", "TooManyFollowers", None, (), 5,
              "This worker already streams as many followed logs as it may, so probes always find a free thread."),
    ErrorCode(429, "too_many_streams", "TooManyStreams", "TooManyStreams", None, (), 5,
              "The agent already serves as many event streams as it may, so other requests always find a thread."),
    ErrorCode(429, "too_many_exec_sessions", "TooManyExecSessions", "TooManyExecSessions", None, (), 5,
              "The claim (UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM) or the agent (16) already runs as many exec sessions as it may."),
    ErrorCode(500, "node_fault", "NodeFault", "NodeFault", None, (), None,
              "The node itself failed the request (say, the agent may not mount); not the caller's fault: tell its operator."),
    ErrorCode(502, "image_pull_failed", "ImagePullFailed", "ImagePullFailed", None, ("image",), None,
              "The registry or the network failed, or the pull of `image` stalled; the message carries the reason. Worth retrying."),
    ErrorCode(502, "engine_error", "EngineError", "EngineError", None, (), None,
              "The engine answered with a failure of its own; the state is unknown until a later read."),
    ErrorCode(503, "engine_unavailable", "EngineUnavailable", "EngineUnavailable", None, (), 5,
              "The Docker engine did not answer in time; nothing was done."),
    ErrorCode(503, "nvml_hung", "NvmlHung", "NvmlHung", "engine_unavailable", (), 5,
              "An NVML call has not returned within UTOPIA_AGENT_NVML_TIMEOUT: GPUs cannot be given now; nothing was done."),
    ErrorCode(503, "network_unprotected", "NetworkUnprotected", "NetworkUnprotected", "engine_unavailable", (), 5,
              "The claims' network isolation is not in place (rules gone and not restored, or the network not made): "
              "no claim is started unprotected; nothing was done."),
    ErrorCode(503, "allocation_busy", "AllocationBusy", "AllocationBusy", "engine_unavailable", (), 1,
              "Other creates held the node's allocation lock for too long; nothing was done."),
    ErrorCode(507, "insufficient_storage", "InsufficientStorage", "InsufficientStorage", None, ("image", "filesystem"), None,
              "No room on the node: the image store for the pull of `image`, even after collecting unused images; the agent's "
              "state dir for a write of its own (`filesystem` names it; nothing was changed); or, on a create, disk pressure "
              "(`filesystem` names the engine's data root or the state dir)."),
)
ERROR_CODES_BY_CODE: dict[str, ErrorCode] = {row.code: row for row in ERROR_CODES}


def error_codes() -> list[str]:
    """Every `error` code the agent answers with (the OpenAPI enum)."""
    return sorted(ERROR_CODES_BY_CODE)


class AgentError(Exception):
    """Base of every error the agent answers on purpose; each code's class fixes its status."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}

    def headers(self) -> dict[str, str]:
        retry_after = ERROR_CODES_BY_CODE[self.code].retry_after
        return {} if retry_after is None else {"Retry-After": str(retry_after)}


class _Challenge:
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="utopia-agent"'}


class _Allow:
    def __init__(self, message: str, allowed: list[str]):
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class _BodyLimit:
    @classmethod
    def over(cls, max_body_bytes: int) -> AgentError:
        return cls(
            f"the body is larger than {max_body_bytes} bytes, this node's UTOPIA_AGENT_MAX_BODY_BYTES",
            max_body_bytes=max_body_bytes,
        )


class _Holder:
    @classmethod
    def held_by(cls, claim_id: str, container_id: str | None, same_spec: bool) -> AgentError:
        """`same_spec`: whether that container was made from the very request now asked (its spec digest)."""
        return cls(f"claim {claim_id} already has a container", claim_id=claim_id, container_id=container_id, same_spec=same_spec)


class _NoRoom:
    @classmethod
    def state_dir_full(cls, state_dir: str, reason: str) -> AgentError:
        return cls(f"the agent's state dir {state_dir} has no room ({reason}); nothing was changed", filesystem=state_dir)


# What a write that found no room fails with: the filesystem is full, or a quota is spent.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# What a code's class does beyond its status, code and fields.
_BEHAVIOUR: dict[str, type] = {
    "unauthorized": _Challenge,
    "method_not_allowed": _Allow,
    "body_too_large": _BodyLimit,
    "claim_exists": _Holder,
    "insufficient_storage": _NoRoom,
}


def _server_classes() -> dict[str, type[AgentError]]:
    classes: dict[str, type[AgentError]] = {"internal_error": AgentError}
    for row in ERROR_CODES[1:]:
        family = classes[row.family or "internal_error"]
        bases = (_BEHAVIOUR[row.code], family) if row.code in _BEHAVIOUR else (family,)
        classes[row.code] = type(row.server, bases, {"__doc__": row.doc, "__module__": __name__, "status": row.status, "code": row.code})
    return classes


SERVER_CLASSES = _server_classes()
globals().update({cls.__name__: cls for cls in SERVER_CLASSES.values()})


class NotManaged(SERVER_CLASSES["not_found"]):
    """Unknown id, or a container this agent does not manage (which it never touches)."""
