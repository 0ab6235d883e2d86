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
import json
import math
import ssl
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import requests

from .. import __version__
from ..claims.records import PortMapping
from ..schemas import (
    MAX_EVENTS_TIMEOUT_SECONDS,
    ContainerSchema,
    CreatedSchema,
    HealthSchema,
)
from .errors import AgentUnreachable, ClaimExists, RevisionTooOld, UnexpectedAnswer, error_from_response, retry_after_seconds
from ..exec.schemas import ExecResultSchema
from ..images.schemas import ImageSchema
from ..node.schemas import MetricsSchema
from .exec import ExecSession
from ..volumes.schemas import VolumeSchema
from .records import (
    Container,
    ContainerGpuStats,
    ContainerStats,
    Created,
    ExecResult,
    Gpu,
    GpuMetrics,
    Health,
    Image,
    NodeMetrics,
    PullProgress,
    SystemMetrics,
    Volume,
    XidEvent,
    load_answer,
    make_record,
)

DEFAULT_TIMEOUT = 30.0
# A create may pull its image: longer than the agent's default UTOPIA_AGENT_PULL_TIMEOUT (1800 s).
DEFAULT_CREATE_TIMEOUT = 1900.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT = 30.0
BACKOFF_FIRST_SECONDS = 0.5


def tls_reason(error: BaseException) -> str:
    """The TLS layer's own words for a failed handshake, not the layers of wrapping around them."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        cause = pending.pop()
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message} (give the CA that signed the agent's certificate: ca_file, --ca-file)"
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        if isinstance(cause, BaseException) and id(cause) not in seen:
            seen.add(id(cause))
            pending += [cause.__cause__, cause.__context__, *(arg for arg in cause.args if isinstance(arg, BaseException))]
            pending += [getattr(cause, "reason", None)]
    return str(error)


class AgentClient:
    """The agent at `url` (`http://host:8600`, `https://...`), authenticated by `token` or the file `token_file`.

    `timeout` bounds every call but a create, which may pull its image (`create_timeout`).
    On HTTPS, `ca_file` is the CA that signed the agent's certificate (default: the system's),
    and `client_cert` the client certificate an agent with UTOPIA_AGENT_TLS_CLIENT_CA_FILE
    asks for: `(cert_file, key_file)`, or one file holding both.
    """

    def __init__(self, url: str, token: str | None = None, token_file: str | Path | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, create_timeout: float = DEFAULT_CREATE_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
                 ca_file: str | Path | None = None, client_cert: str | Path | tuple[str | Path, str | Path] | None = None):
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
        # Given with each request: requests lets REQUESTS_CA_BUNDLE override a session's own `verify`.
        self._tls: dict[str, Any] = {}
        if ca_file is not None:
            self._tls["verify"] = str(ca_file)
        if client_cert is not None:
            self._tls["cert"] = tuple(map(str, client_cert)) if isinstance(client_cert, tuple) else str(client_cert)
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
        kwargs = {**self._tls, **kwargs}
        return self.session.request(method, self.url + path, headers=headers, **kwargs)

    def _call(self, method: str, path: str, expect: tuple[int, ...], *, gone_on_retry: tuple[int, ...] = (),
              resend: bool = True, **kwargs) -> requests.Response:
        """`send` with the retries of the module docstring; an answer outside `expect` is raised.

        `gone_on_retry`: statuses that mean success once an earlier attempt may have gone through.
        `resend=False`: a request that may have reached the agent is never sent again (only a 503, which did nothing, is).
        """
        headers = {"X-Request-ID": uuid.uuid4().hex, **(kwargs.pop("headers", None) or {})}
        attempt, maybe_done = 0, False
        while True:
            try:
                response = self.send(method, path, headers=headers, **kwargs)
            except requests.exceptions.SSLError as error:
                # A certificate that does not verify, or one the agent refuses, will not change on a retry.
                raise AgentUnreachable(f"{method} {self.url}{path}: TLS failed: {tls_reason(error)}") from None
            except requests.ConnectionError as error:
                if attempt >= self.retries or not resend:
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
                self._wait(attempt, retry_after_seconds(response))
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
               disk_gb: float | None = None, restart_policy: str | None = None, registry_auth: Mapping[str, str] | None = None,
               mounts: Iterable[Mapping[str, Any]] = ()) -> Created:
        """Create and start the container of a claim; safe to call again after a timeout.

        The claim id is the idempotency key: when the claim already has a container made from
        this very request (the agent compares the digest of the whole request, `same_spec` in its
        409), that container is returned with `existing=True`; any other raises ClaimExists. The optional fields are sent only when
        given, so an agent that predates them still accepts the request. `registry_auth`
        (`{"username", "password"}`) is the image registry's credentials, sent for that create only.
        `mounts`: claim volumes, `{"volume", "path", "read_only"}` each (see `create_volume`).
        """
        ports = [m if isinstance(m, PortMapping) else PortMapping(**m) for m in port_mappings]
        body: dict[str, Any] = {
            "claim_id": claim_id, "image": image, "gpu_count": gpu_count,
            "port_mappings": [dataclasses.asdict(m) for m in ports], "env_vars": list(env_vars),
            "command": list(command), "working_dir": working_dir, "volumes": dict(volumes or {}),
        }
        asked = {"cpus": cpus, "memory_mb": memory_mb, "shm_size_mb": shm_size_mb, "disk_gb": disk_gb}
        resources = {k: v for k, v in asked.items() if v is not None}
        body.update(resources)
        if restart_policy is not None:
            body["restart_policy"] = restart_policy
        if mounts:
            body["mounts"] = [dict(mount) for mount in mounts]
        if registry_auth is not None:
            body["registry_auth"] = {"username": registry_auth["username"], "password": registry_auth["password"]}
        try:
            data = self._json("POST", "/api/v1/containers", 201, json=body, timeout=self.create_timeout)
        except ClaimExists as exists:
            if exists.container_id is None or exists.same_spec is not True:
                raise
            return Created(exists.container_id, existing=True)
        return make_record(Created, load_answer(CreatedSchema(), data))

    def list(self, claim_id: str | None = None) -> list[Container]:
        params = {"claim_id": claim_id} if claim_id is not None else None
        data = self._json("GET", "/api/v1/containers", params=params)
        return [make_record(Container, item) for item in load_answer(ContainerSchema(), data, many=True)]

    def get(self, container_id: str) -> Container:
        """One container by its full id or a unique prefix of at least 12 hex digits."""
        return make_record(Container, load_answer(ContainerSchema(), self._json("GET", f"/api/v1/containers/{container_id}")))

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

    def watch(self, since: int | None = None, heartbeats: bool = False, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The node's changes (GET /api/v1/events) as dicts, for as long as the caller iterates, or
        for `timeout` seconds: the agent ends the stream then (`?timeout=`), and so does this.

        A dropped connection is resumed from the last revision seen, so no change is missed or
        repeated. When the agent no longer holds the changes after it (410 revision_too_old), the
        containers are listed again and a `{"kind": "relist", "revision": R, "containers": [...]}`
        comes before the changes after R: the caller replaces what it knew with that list."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            params: dict[str, int] = {} if since is None else {"since": since}
            if deadline is not None:
                left = math.ceil(deadline - time.monotonic())
                if left <= 0:
                    return
                params["timeout"] = min(left, MAX_EVENTS_TIMEOUT_SECONDS)
            try:
                response = self._call("GET", "/api/v1/events", (200,), params=params, stream=True, timeout=(self.timeout, None))
            except RevisionTooOld:
                containers, since = self.listing()
                yield {"kind": "relist", "revision": since, "containers": containers}
                continue
            try:
                with response:
                    for line in response.iter_lines():
                        if not line:
                            continue
                        change = json.loads(line)
                        since, attempt = change["revision"], 0
                        if heartbeats or change["kind"] != "heartbeat":
                            yield change
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                pass
            if deadline is not None and time.monotonic() >= deadline:
                return
            if attempt >= self.retries:
                raise AgentUnreachable(f"GET {self.url}/api/v1/events: the stream kept ending")
            self._wait(attempt, None)
            attempt += 1

    def listing(self) -> tuple[list[Container], int]:
        """Every container and the revision of the node's changes the list is exact at: watch from it."""
        response = self._call("GET", "/api/v1/containers", (200,))
        containers = [make_record(Container, item) for item in load_answer(ContainerSchema(), response.json(), many=True)]
        return containers, int(response.headers["X-Utopia-Revision"])

    def revision(self) -> int:
        """The node's last revision: what `watch(since=...)` starts after to see only new changes."""
        return int(self._call("GET", "/api/v1/node", (200,)).headers["X-Utopia-Revision"])

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

    def exec(self, container_id: str, command: Iterable[str], *, env: Iterable[str] = (), working_dir: str = "",
             timeout: float | None = None) -> ExecResult:
        """Run `command` in the container to its end (or `timeout` seconds, the agent's default 60, when it is killed).
        A connection lost on the way is not retried: the command may have run, and may not be safe to run twice."""
        body: dict[str, Any] = {"command": list(command), "env": list(env), "working_dir": working_dir}
        if timeout is not None:
            body["timeout"] = timeout
        wait = (timeout if timeout is not None else 60.0) + self.timeout
        response = self._call("POST", f"/api/v1/containers/{container_id}/exec", (200,), json=body, timeout=wait, resend=False)
        return make_record(ExecResult, load_answer(ExecResultSchema(), response.json()))

    def exec_session(self, container_id: str, command: Iterable[str], *, stdin: bool = False, tty: bool = False) -> ExecSession:
        """An interactive session running `command` (a WebSocket in Kubernetes' channel protocol); close it when done."""
        token = self._authorization.removeprefix("Bearer ") if self._authorization else None
        return ExecSession.open(self.url, token, container_id, command, stdin=stdin, tty=tty, timeout=self.timeout,
                                ca_file=self._tls.get("verify"), client_cert=self._tls.get("cert"))

    def stats(self, container_id: str) -> ContainerStats:
        data = self._json("GET", f"/api/v1/containers/{container_id}/stats")
        gpus = [make_record(ContainerGpuStats, gpu) for gpu in data.get("gpus") or []]
        return make_record(ContainerStats, {**data, "gpus": gpus})

    # --- GPUs and the node --------------------------------------------------------------

    def gpus(self) -> list[Gpu]:
        data = self._json("GET", "/api/v1/gpus")
        return [make_record(Gpu, {**gpu, "xid_events": [make_record(XidEvent, e) for e in gpu.get("xid_events") or []]}) for gpu in data]

    def stop(self, container_id: str) -> Container:
        """Stop the claim and free its GPUs, ports and CPUs; its container, writable layer and volumes stay."""
        return make_record(Container, load_answer(ContainerSchema(), self._json("POST", f"/api/v1/containers/{container_id}/stop")))

    def start(self, container_id: str) -> Container:
        """Start a stopped claim with the GPUs and ports it was made with: NoGpusFree, PortTaken or
        NotEnoughResources (naming the holder's `claim_id`) while another claim holds any of them."""
        return make_record(Container, load_answer(ContainerSchema(), self._json("POST", f"/api/v1/containers/{container_id}/start")))

    # --- claim volumes --------------------------------------------------------------------

    def volumes(self) -> list[Volume]:
        return [make_record(Volume, v) for v in load_answer(VolumeSchema(), self._json("GET", "/api/v1/volumes"), many=True)]

    def volume(self, name: str) -> Volume:
        return make_record(Volume, load_answer(VolumeSchema(), self._json("GET", f"/api/v1/volumes/{name}")))

    def create_volume(self, name: str, size_gb: int) -> Volume:
        """A node-local volume of a hard size (VolumeExists; NotEnoughResources with `free_disk_gb`)."""
        return make_record(Volume, load_answer(VolumeSchema(), self._json("POST", "/api/v1/volumes", 201, json={"name": name, "size_gb": size_gb})))

    def delete_volume(self, name: str) -> None:
        """Remove a volume and its data (VolumeInUse while a claim, running or stopped, mounts it)."""
        self._call("DELETE", f"/api/v1/volumes/{name}", (204,), gone_on_retry=(404,))

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

    # --- images -------------------------------------------------------------------------

    def images(self) -> list[Image]:
        """The images the node holds, then the pulls in flight with their progress."""
        return [_image(entry) for entry in load_answer(ImageSchema(), self._json("GET", "/api/v1/images"), many=True)]

    def pull(self, image: str, registry_auth: Mapping[str, str] | None = None) -> Image:
        """Pull ahead of the claims that will need `image` (state `pulling`; `present` when the node has it)."""
        body: dict[str, Any] = {"image": image}
        if registry_auth is not None:
            body["registry_auth"] = {"username": registry_auth["username"], "password": registry_auth["password"]}
        response = self._call("POST", "/api/v1/images", (200, 202), json=body)
        return _image(load_answer(ImageSchema(), response.json()))

    def remove_image(self, reference: str) -> None:
        """Remove an image no container uses (ImageInUse otherwise)."""
        self._call("DELETE", f"/api/v1/images/{reference}", (204,), gone_on_retry=(404,))

    def metrics(self) -> NodeMetrics:
        data = load_answer(MetricsSchema(), self._json("GET", "/api/v1/metrics"))
        return make_record(NodeMetrics, {
            **data,
            "gpus": [make_record(GpuMetrics, gpu) for gpu in data["gpus"]],
            "system": make_record(SystemMetrics, data["system"]),
        })

    # --- no auth ------------------------------------------------------------------------

    def health(self) -> Health:
        """The agent's health, healthy or not; raises only when it cannot be asked."""
        response = self._call("GET", "/health", (200, 503), auth=False)
        try:
            return make_record(Health, load_answer(HealthSchema(), response.json()))
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


def _image(entry: Mapping[str, Any]) -> Image:
    progress = entry.get("progress")
    return make_record(Image, {**entry, "progress": make_record(PullProgress, progress) if progress else None})
