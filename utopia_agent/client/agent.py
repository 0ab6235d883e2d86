"""A typed client of the agent's HTTP API, for orchestrators, the CLI, the tests and the bench.

    client = AgentClient("http://gpu-node-1:8600", token_file="/etc/utopia-agent/token")
    created = client.create("claim-42", "registry.example.com/train:1.4", gpu_count=2)
    client.get(created.container_id).gpu_ids

One `requests.Session`, so calls reuse keep-alive connections. Answers are loaded through
the server's own marshmallow schemas (utopia_agent.schemas) into small frozen records, and
every error the agent answers is raised as its own class (see `ApiError`), carrying the
body's fields. Nothing here imports Flask or docker.

Retries, all bounded by `retries`:
- 503 (the engine is unreachable, or the allocation lock is busy: nothing was done) is
  retried after `Retry-After` (at most `max_retry_wait` seconds), else after a backoff;
- a connection that fails before an answer is retried after a backoff. A create is safe to
  retry: the claim id is its idempotency key (see `create`); a delete whose earlier attempt
  may have gone through takes a 404 on the retry as done.
A read timeout is never retried: the caller's timeout is its patience. Calling again is safe.
"""

from __future__ import annotations

import codecs
import dataclasses
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import requests
from marshmallow import INCLUDE, Schema, ValidationError

from .. import __version__
from ..claims.records import PORTS_LABEL, PortMapping, parse_ports
from ..schemas import (
    ContainerSchema,
    CreatedSchema,
    ErrorSchema,
    HealthSchema,
    MetricsSchema,
)

DEFAULT_TIMEOUT = 30.0
# A create may pull its image: longer than the agent's default UTOPIA_AGENT_PULL_TIMEOUT (1800 s).
DEFAULT_CREATE_TIMEOUT = 1900.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT = 30.0
BACKOFF_FIRST_SECONDS = 0.5

R = TypeVar("R")


# --------------------------------------------------------------------------- errors


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
    """The claim's CPUs or memory exceed what is free: `free_cpus` and `free_memory_mb` say what is."""

    code = "not_enough_resources"

    @property
    def free_cpus(self) -> float | None:
        return self.body.get("free_cpus")

    @property
    def free_memory_mb(self) -> int | None:
        return self.body.get("free_memory_mb")


class GpuNotFound(NotFound):
    """No GPU of that UUID on the node."""

    code = "gpu_not_found"


class BodyTooLarge(ApiError):
    status, code = 413, "body_too_large"


class TooManyFollowers(ApiError):
    """This worker already streams as many followed logs as it may; retry after Retry-After."""

    status, code, retryable = 429, "too_many_followers", True


class InternalError(ApiError):
    status, code = 500, "internal_error"


class NodeFault(ApiError):
    """The node itself failed the request (not the caller's fault): tell its operator."""

    status, code = 500, "node_fault"


class ImagePullFailed(ApiError):
    """The registry refused or never delivered `image`; the message has its reason."""

    status, code = 502, "image_pull_failed"

    @property
    def image(self) -> str | None:
        return self.body.get("image")


class EngineError(ApiError):
    """The engine failed the call; the state is unknown until a later read."""

    status, code = 502, "engine_error"


class EngineUnavailable(ApiError):
    """The engine did not answer in time; nothing was done. Raised once the retries are spent."""

    status, code, retryable = 503, "engine_unavailable", True


class NvmlHung(EngineUnavailable):
    """NVML does not answer on the node, so GPUs cannot be given now; nothing was done."""

    code = "nvml_hung"


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


def _retry_after(response: requests.Response) -> float | None:
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
    return cls(response.status_code, body, response.headers.get("X-Request-ID"), _retry_after(response))


# --------------------------------------------------------------------------- records


def _record(cls: type[R], values: Mapping[str, Any]) -> R:
    """`cls` from the fields it knows; fields it lacks are left out, so a newer server's additions do no harm."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def _load(schema: Schema, data: Any, many: bool = False) -> Any:
    """Validate an answer with the server's schema; fields the schema does not know pass through."""
    try:
        return schema.load(data, unknown=INCLUDE, many=many)
    except ValidationError as error:
        raise UnexpectedAnswer(f"the answer does not fit {type(schema).__name__}: {error.messages}") from None


@dataclass(frozen=True)
class Container:
    """A managed container (GET /api/v1/containers[/<id>])."""

    id: str
    claim_id: str
    image: str
    status: str
    gpu_ids: list[int]
    ports: dict[str, str]
    created: int
    started: int
    labels: dict[str, str]
    exit_code: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    finished: int = 0
    error: str = ""
    resources: dict[str, Any] | None = None

    @property
    def port_mappings(self) -> frozenset[PortMapping]:
        """Every published port, from the `utopia.ports` label (`ports` keeps one host port per container port)."""
        return frozenset(parse_ports(self.labels.get(PORTS_LABEL, "")))


@dataclass(frozen=True)
class Created:
    """POST /api/v1/containers: `existing` is true when the claim already had this very container."""

    container_id: str
    existing: bool = False


@dataclass(frozen=True)
class GpuMetrics:
    id: int
    temperature_c: int | None
    memory_total_mb: int | None
    memory_used_mb: int | None
    name: str | None
    uuid: str | None
    busy: bool
    usage_percent: float | None
    healthy: bool = True


@dataclass(frozen=True)
class SystemMetrics:
    cpu_usage_percent: float
    memory_usage_percent: float
    memory_total_mb: int
    memory_used_mb: int
    disk_usage_percent: float
    load_average: float
    uptime: int


@dataclass(frozen=True)
class NodeMetrics:
    """GET /api/v1/metrics."""

    node_id: str
    cpu_usage_percent: float
    memory_usage_percent: float
    gpus: list[GpuMetrics]
    system: SystemMetrics


@dataclass(frozen=True)
class Health:
    """GET /health, healthy (200) or not (503): `reason` says why not."""

    status: str
    timestamp: str
    reason: str | None = None
    draining: bool = False

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


# The records below follow the contract's shapes for endpoints whose server schemas are not
# in this tree yet (issues 14 and 15); they are built field by field from the answer until
# those schemas land, and then loaded through them like the records above.


@dataclass(frozen=True)
class ContainerGpuStats:
    id: int
    uuid: str | None = None
    memory_used_mb: int | None = None
    usage_percent: float | None = None


@dataclass(frozen=True)
class ContainerStats:
    """GET /api/v1/containers/<id>/stats."""

    cpu_percent: float | None = None
    memory_used_mb: int | None = None
    memory_limit_mb: int | None = None
    gpus: list[ContainerGpuStats] = field(default_factory=list)


@dataclass(frozen=True)
class XidEvent:
    time: Any = None
    code: int | None = None


@dataclass(frozen=True)
class Gpu:
    """One GPU of GET /api/v1/gpus: `state` is free, allocated, releasing, quarantined or lost."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    state: str = ""
    claim_id: str | None = None
    reason: str | None = None
    xid_events: list[XidEvent] = field(default_factory=list)


# --------------------------------------------------------------------------- the client


def same_spec(container: Container, image: str, gpu_count: int, port_mappings: Iterable[PortMapping],
              resources: Mapping[str, Any]) -> bool:
    """Whether `container` is what a create of this spec would have made, as far as the container
    object shows it: the image reference, the number of GPUs, every published port, and the
    `cpus`/`memory_mb`/`shm_size_mb` asked for (where the agent reports resources). Env vars,
    command, working dir and volumes are not shown, so they are not compared."""
    if container.image != image or len(container.gpu_ids) != gpu_count:
        return False
    if container.port_mappings != frozenset(port_mappings):
        return False
    applied = container.resources or {}
    return all(applied.get(key) == value for key, value in resources.items() if key in applied)


class AgentClient:
    """The agent at `url` (`http://host:8600`), authenticated by `token` or the file `token_file`.

    `timeout` bounds every call but a create, which may pull its image (`create_timeout`).
    """

    def __init__(self, url: str, token: str | None = None, token_file: str | Path | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, create_timeout: float = DEFAULT_CREATE_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT):
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token_file is not None:
            token = Path(token_file).read_text().strip()
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.create_timeout = create_timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"utopia-agent-client/{__version__}"
        self._authorization = f"Bearer {token}" if token else None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- raw HTTP -----------------------------------------------------------------------

    def send(self, method: str, path: str, auth: bool = True, **kwargs) -> requests.Response:
        """One request as it is, on the client's session: no retries, no error classes.

        For callers that need the raw answer (tests of malformed requests, benchmarks).
        """
        headers = dict(kwargs.pop("headers", None) or {})
        if auth and self._authorization:
            headers.setdefault("Authorization", self._authorization)
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, self.url + path, headers=headers, **kwargs)

    def _call(self, method: str, path: str, expect: tuple[int, ...], *, gone_on_retry: tuple[int, ...] = (),
              **kwargs) -> requests.Response:
        """`send` with the retries of the module docstring; an answer outside `expect` is raised.

        `gone_on_retry`: statuses that mean success once an earlier attempt may have gone through.
        """
        headers = {"X-Request-ID": uuid.uuid4().hex, **(kwargs.pop("headers", None) or {})}
        attempt, maybe_done = 0, False
        while True:
            try:
                response = self.send(method, path, headers=headers, **kwargs)
            except requests.ConnectionError as error:
                if attempt >= self.retries:
                    raise AgentUnreachable(f"{method} {self.url}{path}: {error}") from None
                maybe_done = True
                self._wait(attempt, None)
                attempt += 1
                continue
            except requests.Timeout as error:
                raise AgentUnreachable(f"{method} {self.url}{path}: no answer in time ({error})") from None
            if response.status_code in expect or (maybe_done and response.status_code in gone_on_retry):
                return response
            if response.status_code == 503 and attempt < self.retries:
                self._wait(attempt, _retry_after(response))
                attempt += 1
                continue
            raise error_from_response(response)

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        wait = retry_after if retry_after is not None else BACKOFF_FIRST_SECONDS * 2**attempt
        time.sleep(min(wait, self.max_retry_wait))

    def _json(self, method: str, path: str, expect: int = 200, **kwargs) -> Any:
        response = self._call(method, path, (expect,), **kwargs)
        try:
            return response.json()
        except ValueError:
            raise UnexpectedAnswer(f"{method} {path} answered {response.status_code} without JSON") from None

    # --- containers ---------------------------------------------------------------------

    def create(self, claim_id: str, image: str, *, gpu_count: int = 0,
               port_mappings: Iterable[PortMapping | Mapping[str, Any]] = (), env_vars: Iterable[str] = (),
               command: Iterable[str] = (), working_dir: str = "", volumes: Mapping[str, str] | None = None,
               cpus: float | None = None, memory_mb: int | None = None, shm_size_mb: int | None = None,
               restart_policy: str | None = None) -> Created:
        """Create and start the container of a claim; safe to call again after a timeout.

        The claim id is the idempotency key: when the claim already has a container and it is
        the same spec (see `same_spec`), that container is returned with `existing=True`;
        a container of another spec raises ClaimExists. The optional fields are sent only when
        given, so an agent that predates them still accepts the request.
        """
        ports = [m if isinstance(m, PortMapping) else PortMapping(**m) for m in port_mappings]
        body: dict[str, Any] = {
            "claim_id": claim_id, "image": image, "gpu_count": gpu_count,
            "port_mappings": [dataclasses.asdict(m) for m in ports], "env_vars": list(env_vars),
            "command": list(command), "working_dir": working_dir, "volumes": dict(volumes or {}),
        }
        resources = {k: v for k, v in {"cpus": cpus, "memory_mb": memory_mb, "shm_size_mb": shm_size_mb}.items() if v is not None}
        body.update(resources)
        if restart_policy is not None:
            body["restart_policy"] = restart_policy
        try:
            data = self._json("POST", "/api/v1/containers", 201, json=body, timeout=self.create_timeout)
        except ClaimExists as exists:
            if exists.container_id is None:
                raise
            try:
                container = self.get(exists.container_id)
            except NotFound:
                raise exists from None
            if not same_spec(container, image, gpu_count, ports, resources):
                raise
            return Created(container.id, existing=True)
        return _record(Created, _load(CreatedSchema(), data))

    def list(self, claim_id: str | None = None) -> list[Container]:
        params = {"claim_id": claim_id} if claim_id is not None else None
        data = self._json("GET", "/api/v1/containers", params=params)
        return [_record(Container, item) for item in _load(ContainerSchema(), data, many=True)]

    def get(self, container_id: str) -> Container:
        """One container by its full id or a unique prefix of at least 12 hex digits."""
        return _record(Container, _load(ContainerSchema(), self._json("GET", f"/api/v1/containers/{container_id}")))

    def find(self, claim_id: str) -> Container | None:
        """The container of a claim, or None."""
        found = self.list(claim_id=claim_id)
        return found[0] if found else None

    def delete(self, container_id: str) -> None:
        """Stop and remove the container, freeing its GPUs and ports.

        NotFound means there is no such managed container; after a lost answer, the retry's
        404 is taken as done.
        """
        self._call("DELETE", f"/api/v1/containers/{container_id}", (204,), gone_on_retry=(404,))

    def logs(self, container_id: str, tail: int | None = None, since: int | None = None,
             timestamps: bool = False) -> str:
        """The container's output (stdout and stderr), the last `tail` lines (the agent's default: 100)."""
        params = _log_params(tail, since, timestamps, follow=False)
        return self._call("GET", f"/api/v1/containers/{container_id}/logs", (200,), params=params).text

    def follow_logs(self, container_id: str, tail: int | None = None, since: int | None = None,
                    timestamps: bool = False) -> Iterator[str]:
        """The output as it comes, until the container stops or the agent ends the stream
        (after UTOPIA_AGENT_LOG_FOLLOW_SECONDS). TooManyFollowers when the worker has enough followers."""
        params = _log_params(tail, since, timestamps, follow=True)
        response = self._call("GET", f"/api/v1/containers/{container_id}/logs", (200,), params=params, stream=True,
                              timeout=(self.timeout, None))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with response:
            for chunk in response.iter_content(chunk_size=None):
                text = decoder.decode(chunk)
                if text:
                    yield text
        if tail_text := decoder.decode(b"", final=True):
            yield tail_text

    def stats(self, container_id: str) -> ContainerStats:
        data = self._json("GET", f"/api/v1/containers/{container_id}/stats")
        gpus = [_record(ContainerGpuStats, gpu) for gpu in data.get("gpus") or []]
        return _record(ContainerStats, {**data, "gpus": gpus})

    # --- GPUs and the node --------------------------------------------------------------

    def gpus(self) -> list[Gpu]:
        data = self._json("GET", "/api/v1/gpus")
        return [_record(Gpu, {**gpu, "xid_events": [_record(XidEvent, e) for e in gpu.get("xid_events") or []]}) for gpu in data]

    def quarantine(self, gpu_uuid: str, reason: str) -> None:
        """Never give this GPU again until it is released."""
        self._call("POST", f"/api/v1/gpus/{gpu_uuid}/quarantine", (200, 201, 204), json={"reason": reason})

    def release(self, gpu_uuid: str) -> None:
        """Lift a quarantine; Conflict while a claim holds the GPU."""
        self._call("DELETE", f"/api/v1/gpus/{gpu_uuid}/quarantine", (200, 204))

    def node(self) -> dict[str, Any]:
        """GET /api/v1/node as the agent answers it (versions, CPUs, memory, topology, drain state);
        a typed record comes with its server schema."""
        return self._json("GET", "/api/v1/node")

    def drain(self, reason: str) -> None:
        """Take no new claims (creates get NodeDraining) until `resume`; survives agent restarts."""
        self._call("POST", "/api/v1/node/drain", (200, 201, 204), json={"reason": reason})

    def resume(self) -> None:
        self._call("DELETE", "/api/v1/node/drain", (200, 204))

    def metrics(self) -> NodeMetrics:
        data = _load(MetricsSchema(), self._json("GET", "/api/v1/metrics"))
        return _record(NodeMetrics, {
            **data,
            "gpus": [_record(GpuMetrics, gpu) for gpu in data["gpus"]],
            "system": _record(SystemMetrics, data["system"]),
        })

    # --- no auth ------------------------------------------------------------------------

    def health(self) -> Health:
        """The agent's health, healthy or not; raises only when it cannot be asked."""
        response = self._call("GET", "/health", (200, 503), auth=False)
        try:
            return _record(Health, _load(HealthSchema(), response.json()))
        except ValueError:
            raise UnexpectedAnswer(f"/health answered {response.status_code} without JSON") from None

    def openapi(self) -> dict[str, Any]:
        return self._json("GET", "/openapi.json", auth=False)

    def prometheus(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        return self._call("GET", "/metrics", (200,)).text


def _log_params(tail: int | None, since: int | None, timestamps: bool, follow: bool) -> dict[str, str]:
    params = {"timestamps": str(timestamps).lower(), "follow": str(follow).lower()}
    if tail is not None:
        params["tail"] = str(tail)
    if since is not None:
        params["since"] = str(since)
    return params
