"""The thin layer over the Docker engine: the only module that imports `docker`.

It speaks in our own records (`ManagedContainer`) and raises our own domain errors, so
routes never see an engine exception. Every container it creates carries labels from which
the agent rebuilds all of its state: the engine is the source of truth.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

import docker
import requests
import urllib3
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.errors import APIError, DockerException, NotFound
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from .config import Config
from .errors import (
    AgentError,
    ClaimExists,
    Conflict,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    ImagePullFailed,
    NotManaged,
    PortTaken,
)
from .node_view import ContainerState, NodeView
from .prometheus import PULL_DURATION
from .resources import CONTAINER_INFINIBAND_DIR, format_cpu_list, parse_cpu_list
from .schemas import CONTAINER_ID_PATTERN
from .volumes import Volume, decode_hosts, encode_hosts

log = logging.getLogger("utopia_agent.docker")

# Every label the agent reads starts with this; an image may carry none of them (see policy.py).
LABEL_PREFIX = "utopia."
MANAGED_LABEL = "utopia.managed"
CLAIM_LABEL = "utopia.claim_id"
GPU_IDS_LABEL = "utopia.gpu_ids"
GPU_UUIDS_LABEL = "utopia.gpu_uuids"
PORTS_LABEL = "utopia.ports"
VOLUMES_LABEL = "utopia.volumes"
# What the container was given, as applied (see ContainerSpec.labels); a limit's label is left
# out when it has none, so the engine can list just the holders of CPUs or memory.
CPUS_LABEL = "utopia.cpus"
MEMORY_LABEL = "utopia.memory_mb"
SHM_LABEL = "utopia.shm_size_mb"
CPUSET_LABEL = "utopia.cpuset"
PINNING_LABEL = "utopia.cpu_pinning"
EXCLUSIVE_FILTER = f"{PINNING_LABEL}=exclusive"
_MIB = 1024 * 1024
# Capabilities of Docker's default set that a job never needs: NET_RAW (raw sockets: ARP and
# DNS spoofing of neighbours on the bridge), MKNOD (device nodes), AUDIT_WRITE (the host's
# audit log), SETFCAP and SETPCAP (granting file or process capabilities), SYS_CHROOT.
DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP", "SETPCAP", "SYS_CHROOT")
MANAGED_FILTER = f"{MANAGED_LABEL}=true"
NAME_PREFIX = "utopia-"
PULL_PROGRESS_INTERVAL = 5.0
# The NVIDIA runtime (often the engine's default) reads these from the container's environment,
# where the image's ENV stands unless the create call sets the name: every nvidia/cuda image says
# NVIDIA_VISIBLE_DEVICES=all. `void` makes the runtime act as plain runc: no GPU at all.
NO_GPUS_ENV = "NVIDIA_VISIBLE_DEVICES=void"
GPU_CAPABILITIES_ENV = "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
# How the engine refuses an id prefix that several containers share: 500 from Docker 20.10
# ("Multiple IDs found ..."), 400 from later engines ("multiple IDs found ...").
AMBIGUOUS_PREFIX = "multiple ids found with provided prefix"
PORT_TAKEN = ("port is already allocated", "address already in use")



@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"

    @property
    def container_key(self) -> str:
        return f"{self.container_port}/{self.protocol}"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.container_key}"

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        host, _, container = text.partition(":")
        port, _, protocol = container.partition("/")
        return cls(int(host), int(port), protocol or "tcp")


@dataclass(frozen=True)
class ContainerSpec:
    """What a claim asked for, after validation and node policy."""

    claim_id: str
    image: str
    gpu_ids: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    port_mappings: tuple[PortMapping, ...] = ()
    env_vars: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    working_dir: str = ""
    volumes: tuple[Volume, ...] = ()
    # Where the allocator pinned each volume (see volumes.MountPins): what the engine mounts.
    mount_sources: tuple[str, ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None
    shm_size_mb: int | None = None
    restart_policy: str = "no"
    # CPUs and memory nodes the container is confined to (empty: anywhere), and why: numa or exclusive.
    cpuset: tuple[int, ...] = ()
    memory_nodes: tuple[int, ...] = ()
    cpu_pinning: str = ""
    # The node's InfiniBand character devices (host paths), passed through with IPC_LOCK and this memlock (-1: unlimited).
    infiniband_devices: tuple[str, ...] = ()
    memlock_bytes: int = -1

    @property
    def name(self) -> str:
        return container_name(self.claim_id)

    def environment(self) -> list[str]:
        """The caller's variables, then the agent's NVIDIA variables, which replace the image's:
        the container sees the GPUs it was given and no others."""
        if not self.gpu_uuids:
            return [*self.env_vars, NO_GPUS_ENV]
        return [*self.env_vars, "NVIDIA_VISIBLE_DEVICES=" + ",".join(self.gpu_uuids), GPU_CAPABILITIES_ENV]

    def labels(self) -> dict[str, str]:
        """The labels record what the container holds; a label is left out when it holds none,
        so the engine can list just the holders of GPUs or ports (`label=<key>` filters)."""
        labels = {MANAGED_LABEL: "true", CLAIM_LABEL: self.claim_id}
        if self.gpu_ids:
            labels[GPU_IDS_LABEL] = ",".join(str(i) for i in self.gpu_ids)
            labels[GPU_UUIDS_LABEL] = ",".join(self.gpu_uuids)
        if self.port_mappings:
            labels[PORTS_LABEL] = ",".join(str(m) for m in self.port_mappings)
        if self.volumes:
            labels[VOLUMES_LABEL] = encode_hosts(self.volumes)
        if self.cpus is not None:
            labels[CPUS_LABEL] = f"{self.cpus:g}"
        if self.memory_mb is not None:
            labels[MEMORY_LABEL] = str(self.memory_mb)
        if self.shm_size_mb is not None:
            labels[SHM_LABEL] = str(self.shm_size_mb)
        if self.cpuset:
            labels[CPUSET_LABEL] = format_cpu_list(self.cpuset)
            labels[PINNING_LABEL] = self.cpu_pinning
        return labels


@dataclass(frozen=True)
class Holdings:
    """What a managed container holds, as its labels record it: the engine is the only record."""

    claim_id: str
    gpu_ids: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    port_mappings: tuple[PortMapping, ...]
    volume_hosts: tuple[str, ...] = ()
    cpus: float = 0.0
    memory_mb: int = 0
    exclusive_cpus: tuple[int, ...] = ()

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> Holdings:
        resources = resources_from_labels(labels)
        exclusive = labels.get(PINNING_LABEL) == "exclusive"
        return cls(
            claim_id=labels.get(CLAIM_LABEL, ""),
            gpu_ids=_gpu_ids(labels),
            gpu_uuids=tuple(_split(labels.get(GPU_UUIDS_LABEL, ""))),
            port_mappings=_port_mappings(labels),
            volume_hosts=tuple(decode_hosts(labels.get(VOLUMES_LABEL, "[]"))),
            cpus=resources["cpus"] or 0.0,
            memory_mb=resources["memory_mb"] or 0,
            exclusive_cpus=_cpu_ids(labels.get(CPUSET_LABEL, "")) if exclusive else (),
        )


@dataclass(frozen=True)
class ManagedContainer:
    """A container carrying `utopia.managed=true`, in the terms of the contract."""

    id: str
    claim_id: str
    image: str
    status: str
    gpu_ids: tuple[int, ...]
    gpu_uuids: tuple[str, ...]
    port_mappings: tuple[PortMapping, ...]
    created: int
    started: int
    labels: dict[str, str]
    # Everything the engine's inspect said (exit code, restart count, ...), beyond the contract.
    state: ContainerState | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_state(cls, state: ContainerState) -> ManagedContainer:
        held = Holdings.from_labels(state.labels)
        return cls(
            id=state.id,
            claim_id=held.claim_id,
            image=state.image,
            status=state.status,
            gpu_ids=held.gpu_ids,
            gpu_uuids=held.gpu_uuids,
            port_mappings=held.port_mappings,
            created=state.created,
            started=state.started,
            labels=state.labels,
            state=state,
        )

    @property
    def ports(self) -> dict[str, str]:
        ports: dict[str, str] = {}
        for mapping in self.port_mappings:
            ports.setdefault(mapping.container_key, str(mapping.host_port))
        return ports

    @property
    def resources(self) -> dict[str, Any]:
        return resources_from_labels(self.labels)

    def outcome(self) -> dict[str, Any]:
        """How the container last ended, from the node view's record of its inspect: no call per container."""
        state = self.state
        if state is None or not state.finished:
            return {"exit_code": None, "oom_killed": bool(state and state.oom_killed), "restart_count": state.restart_count if state else 0,
                    "finished": 0, "error": state.error if state else ""}
        return {"exit_code": state.exit_code, "oom_killed": state.oom_killed, "restart_count": state.restart_count,
                "finished": state.finished, "error": state.error}


def resources_from_labels(labels: dict[str, str]) -> dict[str, Any]:
    """The container object's `resources`, from the labels written at create: no inspect per container.
    A label that is missing or mangled reads as null (no limit, or a container from before they were recorded)."""

    def number(key: str, kind):
        try:
            return kind(labels[key])
        except (KeyError, ValueError):
            return None

    cpuset = labels.get(CPUSET_LABEL) or None
    return {
        "cpus": number(CPUS_LABEL, float),
        "memory_mb": number(MEMORY_LABEL, int),
        "shm_size_mb": number(SHM_LABEL, int),
        "cpuset": cpuset if cpuset and _cpu_ids(cpuset) else None,
    }


def _cpu_ids(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError:
        return ()


def container_name(claim_id: str) -> str:
    """One name per claim, so the engine itself refuses a second container for it."""
    return NAME_PREFIX + claim_id


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _gpu_ids(labels: dict[str, str]) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split(labels.get(GPU_IDS_LABEL, "")))
    except ValueError:
        return ()


def _port_mappings(labels: dict[str, str]) -> tuple[PortMapping, ...]:
    try:
        return tuple(PortMapping.parse(part) for part in _split(labels.get(PORTS_LABEL, "")))
    except ValueError:
        return ()


class DockerManager:
    """Creates, lists and removes managed containers; one per gunicorn worker, safe across its threads."""

    def __init__(self, config: Config):
        self._config = config
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._answered_at = float("-inf")
        self._data_root: str | None = None
        # Reads come from the node-wide view; `view.volunteer()` makes this process a candidate watcher.
        self.view = NodeView(config.state_dir, self, config.engine_timeout)
        self._presented: tuple[object, tuple[ManagedContainer, ...]] = (None, ())

    # --- the engine connection -------------------------------------------------------

    def _engine(self) -> docker.DockerClient:
        """The client, made on first use so the agent starts (and recovers) while the engine is down.

        Call it inside `_engine_call`: making the client asks the engine its API version. That
        happens before the lock, which guards only the assignment, so threads that find no
        client each wait on the engine for themselves, never on each other.
        """
        client = self._client
        if client is None:
            fresh = self._new_client(self._engine_api_version(), self._config.engine_timeout)
            with self._client_lock:
                if self._client is None:
                    self._client, fresh = fresh, None
                client = self._client
            if fresh is not None:
                fresh.close()
        return client

    @staticmethod
    def _new_client(version: str, timeout: float | None) -> docker.DockerClient:
        """A client speaking `version`: given a version, docker-py makes it without asking the engine."""
        client = docker.from_env(version=version, timeout=timeout)
        # The engine is a local socket: skip requests' proxy and .netrc look-ups on every call.
        client.api.trust_env = False
        return client

    def _engine_api_version(self) -> str:
        """The engine's own API version, which docker-py's version="auto" would speak.

        A fixed version would not do: Docker 20.10 speaks at most 1.41 and Docker 29 refuses
        anything below 1.44. The unversioned GET /version answers whatever the engine accepts.
        """
        probe = self._new_client(MINIMUM_DOCKER_API_VERSION, self._config.engine_timeout)
        try:
            version = probe.api.version(api_version=False).get("ApiVersion")
        finally:
            probe.close()
        if not version:
            raise EngineError("the Docker engine did not say which API version it speaks")
        return version

    def close(self) -> None:
        self.view.close()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @contextmanager
    def _engine_call(self, what: str) -> Iterator[None]:
        """Translate engine failures into domain errors for one call, naming what was attempted."""
        try:
            yield
        except AgentError:
            raise
        except NotFound as exc:
            raise _EngineNotFound(str(exc.explanation or exc)) from None
        except APIError as exc:
            status = exc.status_code or 500
            reason = str(exc.explanation or f"HTTP {status}")
            if status == 409:
                raise _EngineConflict(reason) from None
            if status < 500:
                raise _EngineRejected(reason) from None
            log.warning("engine failed during %s: HTTP %d %s", what, status, reason)
            raise _EngineFailed(f"the Docker engine failed ({what}): {reason}", reason) from None
        except (requests.exceptions.RequestException, DockerException, OSError) as exc:
            reason = "timed out" if _is_timeout(exc) else "unreachable"
            log.warning("engine %s during %s: %s", reason, what, type(exc).__name__)
            raise EngineUnavailable(f"the Docker engine is {reason} ({what})") from None
        self._answered_at = time.monotonic()

    def answered_within(self, seconds: float) -> bool:
        """True when an engine call succeeded in the last `seconds`: a probe can trust it."""
        return time.monotonic() - self._answered_at <= seconds

    def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers within the engine timeout."""
        with self._engine_call("ping"):
            self._engine().api.ping()

    def engine_version(self) -> str:
        """The engine's version with its API version ("20.10.24 (API 1.41)"), for `utopia-agent check`."""
        with self._engine_call("version"):
            info = self._engine().api.version()
        return f"{info.get('Version', 'unknown')} (API {info.get('ApiVersion', 'unknown')})"

    # --- reading ---------------------------------------------------------------------

    def list_managed(self, claim_id: str | None = None) -> Sequence[ManagedContainer]:
        """Every managed container in any state (or the claim's), from the node view when it can be
        trusted, else from the engine (see node_view.py). Allocation decisions never come here: see `holders_of`.

        The whole list is the same tuple for as long as the view does not change, so a caller may
        keep what it derives from it (the list route keeps its JSON) until it gets another one.
        """
        snapshot = self.view.snapshot()
        if snapshot is None:
            states = [ContainerState.from_inspect(info) for row in self.managed_rows(claim_id) if (info := self.inspect(row["Id"])) is not None]
            return tuple(ManagedContainer.from_state(state) for state in states)
        if claim_id is not None:
            return tuple(ManagedContainer.from_state(s) for s in snapshot.labelled(CLAIM_LABEL, claim_id))
        presented_from, containers = self._presented
        if presented_from is not snapshot:
            # A record the view did not change is the same object: so is its ManagedContainer.
            known = {id(c.state): c for c in containers}
            containers = tuple(known.get(id(state)) or ManagedContainer.from_state(state) for state in snapshot.containers)
            self._presented = (snapshot, containers)
        return containers

    def holders_of(self, label: str) -> list[tuple[str, dict[str, str]]]:
        """(id, labels) of the managed containers carrying `label` (GPUs or ports), straight from
        the engine: what allocation decides on. GPU holders are at most about one per GPU."""
        with self._engine_call("list containers"):
            rows = self._engine().api.containers(all=True, filters={"label": [MANAGED_FILTER, label]})
        return [(row["Id"], row.get("Labels") or {}) for row in rows]

    def stale_created(self, older_than: float) -> list[tuple[str, str]]:
        """(id, claim id) of managed containers created but never started `older_than` seconds ago."""
        with self._engine_call("list containers"):
            rows = self._engine().api.containers(all=True, filters={"label": [MANAGED_FILTER], "status": ["created"]})
        cutoff = time.time() - older_than
        return [(row["Id"], (row.get("Labels") or {}).get(CLAIM_LABEL, "")) for row in rows if row["Created"] < cutoff]

    def data_root(self) -> str | None:
        """The engine's data root (`DockerRootDir`), which no volume may reach; None while the engine
        does not say. Read once: it changes only when dockerd restarts with another configuration."""
        if self._data_root is None:
            try:
                with self._engine_call("info"):
                    self._data_root = self._engine().api.info().get("DockerRootDir") or None
            except EngineUnavailable:
                return None
        return self._data_root

    def find_claim(self, claim_id: str, fresh: bool = False) -> str | None:
        """The id of the claim's container, if it has one: the node view when trusted, else the
        engine's list filtered by the claim's label (small, whatever the number of claims)."""
        snapshot = None if fresh else self.view.snapshot()
        if snapshot is not None:
            return next((s.id for s in snapshot.labelled(CLAIM_LABEL, claim_id)), None)
        holders = self.holders_of(f"{CLAIM_LABEL}={claim_id}")
        return holders[0][0] if holders else None

    def get_managed(self, container_id: str) -> ManagedContainer:
        """One managed container by full id or unique prefix of 12+ hex digits; 404 otherwise.

        Only the engine's "no such container" and its refusal of an ambiguous prefix are 404: a
        caller may take 404 for "gone" and release the claim, so an engine failure is never one.
        """
        if not re.fullmatch(CONTAINER_ID_PATTERN, container_id):
            raise NotManaged(f"no managed container {container_id!r}: ids are 12 to 64 hex digits")
        if (snapshot := self.view.snapshot()) is not None:
            matches = snapshot.with_prefix(container_id)
            if len(matches) == 1:
                return ManagedContainer.from_state(matches[0])
        try:
            with self._engine_call("inspect container"):
                info = self._engine().api.inspect_container(container_id)
        except (_EngineNotFound, _EngineRejected, _EngineFailed) as exc:
            if not isinstance(exc, _EngineNotFound) and AMBIGUOUS_PREFIX not in exc.reason.lower():
                raise
            raise NotManaged(f"no managed container {container_id!r}") from None
        labels = info["Config"].get("Labels") or {}
        if labels.get(MANAGED_LABEL) != "true" or not info["Id"].startswith(container_id):
            raise NotManaged(f"no managed container {container_id!r}")
        return ManagedContainer.from_state(ContainerState.from_inspect(info))

    # --- what the node view reads (node_view.py) --------------------------------------

    def managed_rows(self, claim_id: str | None = None) -> list[dict[str, Any]]:
        """The engine's list rows of the managed containers (or the claim's), in any state."""
        labels = [MANAGED_FILTER] + ([f"{CLAIM_LABEL}={claim_id}"] if claim_id is not None else [])
        with self._engine_call("list containers"):
            return self._engine().api.containers(all=True, filters={"label": labels})

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        """The engine's inspect of one container; None once it is gone."""
        try:
            with self._engine_call("inspect container"):
                return self._engine().api.inspect_container(container_id)
        except _EngineNotFound:
            return None

    def managed_events(self, since_ns: int | None, actions: Iterable[str]) -> _EventStream:
        """The engine's events of managed containers from `since_ns` (engine time) on, on a connection
        of their own that never times out; `close()` ends the stream."""
        version = self._engine().api.api_version  # no error mapping: the watcher retries quietly while the engine is down
        client = docker.APIClient(version=version, timeout=None, **docker.utils.kwargs_from_env())
        client.trust_env = False
        since = f"{since_ns // 10**9}.{since_ns % 10**9:09d}" if since_ns else None
        try:
            stream = client.events(since=since, decode=True, filters={"type": ["container"], "label": [MANAGED_FILTER], "event": list(actions)})
        except Exception:
            client.close()
            raise
        return _EventStream(client, stream)

    # --- logs and processes ----------------------------------------------------------

    def logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> bytes:
        """What the engine kept of the container's stdout and stderr, interleaved as they were logged."""
        with self._logs_call(container_id):
            return self._engine().api.logs(container_id, stdout=True, stderr=True, timestamps=timestamps, tail=tail, since=since)

    def follow_logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> LogStream:
        """The logs so far, then new lines as they come, until the container stops or the stream is closed."""
        with self._logs_call(container_id):
            stream = self._engine().api.logs(
                container_id, stdout=True, stderr=True, timestamps=timestamps, tail=tail, since=since, stream=True, follow=True
            )
        return LogStream(stream)

    @contextmanager
    def _logs_call(self, container_id: str) -> Iterator[None]:
        """A container being removed has no logs to give (the engine answers 409): for the caller it is gone."""
        try:
            with self._engine_call("container logs"):
                yield
        except _EngineConflict:
            raise NotManaged(f"container {container_id[:12]} is being removed") from None

    def container_pid(self, container_id: str) -> int:
        """The host PID of the container's main process; 0 when it is not running or gone."""
        try:
            with self._engine_call("inspect container"):
                return int(self._engine().api.inspect_container(container_id)["State"].get("Pid") or 0)
        except _EngineNotFound:
            return 0

    # --- images ----------------------------------------------------------------------

    def _image_labels(self, image: str) -> dict[str, str] | None:
        """The image's labels, or None when the engine does not have it."""
        try:
            with self._engine_call("inspect image"):
                info = self._engine().api.inspect_image(image)
        except _EngineNotFound:
            return None
        return (info.get("Config") or {}).get("Labels") or {}

    def ensure_image(self, image: str) -> dict[str, str]:
        """Pull `image` unless the engine has it, within the pull and no-progress timeouts; return
        its labels, which the engine copies onto every container made from it."""
        labels = self._image_labels(image)
        if labels is None:
            self._pull(image)
            labels = self._image_labels(image)
        if labels is None:
            raise ImagePullFailed(f"cannot pull {image}: the engine lost it right after the pull", image=image)
        return labels

    def _pull(self, image: str) -> None:
        """Pull within the overall and no-progress timeouts, logging progress and the outcome."""
        progress = _PullProgress(image)
        log.info("image pull started image=%s", image, extra={"image": image})
        try:
            self._stream_pull(image, progress)
        except ImagePullFailed as exc:
            PULL_DURATION.labels("failed").observe(progress.elapsed())
            log.warning("image pull failed image=%s seconds=%.1f reason=%s", image, progress.elapsed(), exc.message, extra={"image": image})
            raise
        PULL_DURATION.labels("ok").observe(progress.elapsed())
        log.info("image pull finished image=%s seconds=%.1f %s", image, progress.elapsed(), progress.summary(), extra={"image": image})

    def _stream_pull(self, image: str, progress: _PullProgress) -> None:
        """The engine's pull request, with a read timeout equal to the no-progress timeout.

        docker-py's `pull` sends `timeout=None` and would wait on a stalled registry forever,
        so this sends the same request through its lower-level calls. Closing the response
        is what makes the engine abandon the pull, so every way out of here closes it.
        """
        config = self._config
        with self._engine_call("pull image"):
            api = self._engine().api
        repository, tag = docker.utils.parse_repository_tag(image)
        auth_header = docker.auth.get_config_header(api, docker.auth.resolve_repository_name(repository)[0])
        deadline = time.monotonic() + config.pull_timeout
        response = None
        try:
            response = api._post(
                api._url("/images/create"),
                params={"fromImage": repository, "tag": tag or "latest"},
                headers={"X-Registry-Auth": auth_header} if auth_header else {},
                stream=True,
                timeout=(config.engine_timeout, config.pull_idle_timeout),
            )
            api._raise_for_status(response)
            for event in api._stream_helper(response, decode=True):
                if "error" in event:
                    raise ImagePullFailed(f"cannot pull {image}: {event['error']}", image=image)
                progress.update(event)
                if time.monotonic() > deadline:
                    raise ImagePullFailed(f"cannot pull {image}: took longer than {config.pull_timeout:g} s", image=image)
        except APIError as exc:
            raise ImagePullFailed(f"cannot pull {image}: {exc.explanation or exc}", image=image) from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if _is_timeout(exc):
                raise ImagePullFailed(f"cannot pull {image}: no progress for {config.pull_idle_timeout:g} s", image=image) from None
            raise EngineUnavailable(f"the Docker engine is unreachable (pull image): {type(exc).__name__}") from None
        finally:
            if response is not None:
                response.close()

    # --- creating and removing -------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; its labels record the claim, GPUs and ports."""
        config = self._config
        with self._engine_call("create container"):
            api = self._engine().api
        bindings: dict[str, list[int]] = {}
        for mapping in spec.port_mappings:
            bindings.setdefault(mapping.container_key, []).append(mapping.host_port)
        ib_devices = [f"{host}:{CONTAINER_INFINIBAND_DIR}/{host.rsplit('/', 1)[-1]}:rwm" for host in spec.infiniband_devices]
        memory_bytes = spec.memory_mb * _MIB if spec.memory_mb else None
        host_config = api.create_host_config(
            # Mounts, not Binds: the engine never creates a missing source as root.
            mounts=[
                Mount(volume.target, source, type="bind", read_only=volume.read_only)
                for volume, source in zip(spec.volumes, spec.mount_sources, strict=True)
            ],
            port_bindings=bindings,
            device_requests=[DeviceRequest(driver="nvidia", device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])] if spec.gpu_uuids else None,
            privileged=False,
            cap_drop=list(DROPPED_CAPABILITIES),
            security_opt=["no-new-privileges"],
            pids_limit=config.pids_limit,
            log_config=LogConfig(type="json-file", config={"max-size": config.log_max_size, "max-file": str(config.log_max_files)}),
            restart_policy={"Name": spec.restart_policy} if spec.restart_policy != "no" else None,
            nano_cpus=round(spec.cpus * 1e9) if spec.cpus else None,
            # Swap equal to the limit: no swap, so going over the limit is an OOM kill, not a crawl.
            mem_limit=memory_bytes,
            memswap_limit=memory_bytes,
            ipc_mode="private",
            shm_size=spec.shm_size_mb * _MIB if spec.shm_size_mb else None,
            cpuset_cpus=format_cpu_list(spec.cpuset) or None,
            cpuset_mems=format_cpu_list(spec.memory_nodes) or None,
            # RDMA pins memory: NCCL over InfiniBand needs the devices, IPC_LOCK and no memlock limit.
            devices=ib_devices or None,
            cap_add=["IPC_LOCK"] if ib_devices else None,
            ulimits=[Ulimit(name="memlock", soft=spec.memlock_bytes, hard=spec.memlock_bytes)] if ib_devices else None,
        )
        try:
            with self._engine_call("create container"):
                created = api.create_container(
                    spec.image,
                    command=list(spec.command) or None,
                    environment=spec.environment(),
                    working_dir=spec.working_dir or None,
                    labels=spec.labels(),
                    name=spec.name,
                    ports=[(m.container_port, m.protocol) for m in spec.port_mappings],
                    host_config=host_config,
                    detach=True,
                )
        except _EngineConflict:
            holder = self.find_claim(spec.claim_id, fresh=True)
            if holder is None:
                raise Conflict(f"the container name {spec.name} is taken by a container the agent does not manage") from None
            raise ClaimExists.held_by(spec.claim_id, holder) from None
        except (_EngineRejected, _EngineNotFound) as exc:
            raise EngineRejected(f"the engine refused the container: {exc.message}") from None
        except (EngineUnavailable, _EngineFailed):
            self._remove_if_created(spec.name)
            raise
        return created["Id"]

    def _remove_if_created(self, name: str) -> None:
        """After a create that timed out or failed, the engine may still have made the container: take it away
        (the caller holds the allocation lock), so it never holds GPUs nobody knows about."""
        try:
            with self._engine_call("remove container"):
                self._engine().api.remove_container(name, v=True, force=True)
        except (_EngineNotFound, _EngineConflict):
            pass
        except AgentError:
            log.error("a create timed out and its container %s could not be checked; remove it by hand", name)
        finally:
            self.view.request_resync()

    def start(self, container_id: str) -> None:
        """Start a created container; a port the engine cannot bind is PortTaken."""
        try:
            with self._engine_call("start container"):
                self._engine().api.start(container_id)
        except (_EngineRejected, _EngineConflict, _EngineNotFound, _EngineFailed) as exc:
            if any(text in exc.reason for text in PORT_TAKEN):
                raise PortTaken(f"a host port is already taken on the node: {exc.reason}") from None
            if isinstance(exc, _EngineFailed):
                raise
            raise EngineRejected(f"the container did not start: {exc.reason}") from None
        self.view.await_started(container_id)

    def remove(self, container_id: str, grace_seconds: int | None = None) -> None:
        """Stop within the grace period, then remove with its anonymous volumes."""
        with self._engine_call("remove container"):
            api = self._engine().api
        grace = self._config.stop_timeout if grace_seconds is None else grace_seconds
        try:
            if grace > 0:
                with self._engine_call("stop container"):
                    api.stop(container_id, timeout=grace)
            with self._engine_call("remove container"):
                api.remove_container(container_id, v=True, force=True)
        except _EngineNotFound:  # gone already
            pass
        except _EngineConflict:  # another request is removing it
            return
        self.view.await_removed(container_id)

    def delete_managed(self, container_id: str) -> ManagedContainer:
        """Remove a managed container; any other id is 404 and left alone."""
        container = self.get_managed(container_id)
        self.remove(container.id)
        return container


class LogStream:
    """A followed log: iterate for chunks of bytes; `close` (from any thread) ends the iteration at once."""

    def __init__(self, stream):
        self._stream = stream
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, DockerException, OSError, ValueError):
            if not self._closed.is_set():
                log.info("log stream ended by the engine")

    def close(self) -> None:
        """Shut the engine connection down, waking a read that waits for the next line."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._stream.close()
        except (OSError, DockerException, AttributeError):
            pass


class _EngineAnswer:
    """An engine's error answer; `reason` is the engine's own text."""

    @property
    def reason(self) -> str:
        return self.message


class _EngineNotFound(_EngineAnswer, NotManaged):
    """The engine has no such object; as an answer, the same 404 as an unmanaged id."""


class _EngineConflict(_EngineAnswer, Conflict):
    """The engine refused with 409 (a name in use, mostly)."""


class _EngineRejected(_EngineAnswer, EngineError):
    """The engine refused the request with a 4xx: a 502 unless the caller turns it into something
    better (create and start make it the caller's 400, an ambiguous id prefix is a 404)."""


class _EngineFailed(EngineError):
    """The engine failed with a 5xx: a 502 that names what was attempted and the engine's reason."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class _EventStream:
    """An engine event stream with the client it holds open; closing it closes both."""

    def __init__(self, client: docker.APIClient, stream):
        self._client = client
        self._stream = stream

    def __iter__(self):
        return iter(self._stream)

    def close(self) -> None:
        self._stream.close()
        self._client.close()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc).lower()


class _PullProgress:
    """Logs a pull's progress every few seconds: layers done and bytes downloaded."""

    def __init__(self, image: str):
        self._image = image
        self._started = time.monotonic()
        self._last_log = self._started
        self._layers: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        layer = event.get("id")
        status = event.get("status", "")
        if layer and "progressDetail" in event and event["progressDetail"].get("total"):
            detail = event["progressDetail"]
            if status.startswith("Downloading"):
                self._layers[layer] = (detail.get("current", 0), detail["total"])
        if layer and status in ("Pull complete", "Already exists", "Download complete"):
            self._done.add(layer)
        now = time.monotonic()
        if now - self._last_log >= PULL_PROGRESS_INTERVAL:
            self._last_log = now
            log.info("image pull progress image=%s seconds=%.0f %s", self._image, self.elapsed(), self.summary())

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def summary(self) -> str:
        current = sum(c for c, _ in self._layers.values())
        total = sum(t for _, t in self._layers.values())
        return f"layers_done={len(self._done)} downloaded_mb={current / 1e6:.1f} of_mb={total / 1e6:.1f}"
