"""The thin layer over the Docker engine: its calls, in our own records and domain errors.

It speaks in our own records (claims/records.py) and raises our own domain errors (engine/errors.py), so
routes never see an engine exception. Reads come from the node-wide view when it can be trusted
(node_view.py); what a container is given at create is container_config.py's, the pull request image_pull.py's.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import exec as container_exec
from . import logs as container_logs
from ..config import Config
from .container_config import create_arguments
from .exec import EngineExec
from .logs import LogStream
from .connection import EngineConnection, EventStream
from .image_pull import RegistryAuth, check_access, stream_pull
from .errors import EngineConflict, EngineFailure, EngineNotFound, EngineRefusal
from ..errors import AgentError, ClaimExists, Conflict, EngineRejected, EngineUnavailable, NotManaged, PortTaken
from ..events.history import EventHistory
from .node_view import ContainerState, NodeView, Snapshot
from ..claims.holders import carrying, has_label
from ..claims.records import (
    CLAIM_LABEL, CLAIM_VOLUMES_LABEL, MANAGED_FILTER, MANAGED_LABEL, ContainerSpec, Holdings, ManagedContainer, StopMark, container_name,
)
from ..schemas import CONTAINER_ID_PATTERN

log = logging.getLogger("utopia_agent.docker")

# How the engine refuses an id prefix that several containers share: 500 from Docker 20.10
# ("Multiple IDs found ..."), 400 from later engines ("multiple IDs found ...").
AMBIGUOUS_PREFIX = "multiple ids found with provided prefix"
PORT_TAKEN = ("port is already allocated", "address already in use")
# Records of containers shown but never listed since they went are dropped all at once past this many.
MAX_RECORDS_KEPT = 4096


@dataclass(frozen=True)
class PresentImage:
    """An image the engine holds: its id (`sha256:...`) and the labels it gives its containers."""

    id: str
    labels: dict[str, str]


@dataclass(frozen=True)
class HeldImage:
    """One image in the engine's list: its id, its references and its size in bytes."""

    id: str
    references: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class EngineStorage:
    """Where and how the engine keeps containers' writable layers, as its `info` says."""

    data_root: str
    driver: str
    # DriverStatus's "Backing Filesystem" (overlay2: extfs, xfs, ...); "" where the driver does not say.
    backing_filesystem: str = ""


def read_storage(engine: EngineConnection) -> EngineStorage:
    """The engine's data root and storage driver, from one `info`."""
    with engine.call("info") as api:
        info = api.info()
    status = dict(tuple(pair) for pair in info.get("DriverStatus") or () if len(pair) == 2)
    return EngineStorage(info.get("DockerRootDir") or "", info.get("Driver") or "", status.get("Backing Filesystem", ""))


class DockerManager:
    """Creates, lists and removes managed containers; one per gunicorn worker, safe across its threads."""

    def __init__(self, config: Config, history: EventHistory | None = None):
        self._config = config
        history = history or EventHistory(config.state_dir, config.events_history)
        self._engine = EngineConnection(config.engine_timeout)
        self._storage: EngineStorage | None = None
        # Reads come from the node-wide view; `view.volunteer()` makes this process a candidate watcher.
        self.view = NodeView(config.state_dir, self, config.engine_timeout, history)
        self._presented: tuple[object, tuple[ManagedContainer, ...]] = (None, ())
        self._records: dict[str, ManagedContainer] = {}
        # What each record of the view holds, by container id, while its record stays the same object.
        self._held: dict[str, tuple[ContainerState, Holdings]] = {}

    def close(self) -> None:
        self.view.close()
        self._engine.close()

    def answered_within(self, seconds: float) -> bool:
        """True when an engine call succeeded in the last `seconds`, this worker's or the node view
        watcher's (its heartbeat): a probe can trust it without a round trip of its own."""
        return self._engine.answered_within(seconds) or self.view.engine_answered_within(seconds)

    def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers within the engine timeout."""
        self._engine.ping()

    def engine_version(self) -> str:
        """The engine's version with its API version ("20.10.24 (API 1.41)"), for `utopia-agent check`."""
        with self._engine.call("version") as api:
            info = api.version()
        return f"{info.get('Version', 'unknown')} (API {info.get('ApiVersion', 'unknown')})"

    # --- reading ---------------------------------------------------------------------

    def list_managed(self, claim_id: str | None = None) -> Sequence[ManagedContainer]:
        """Every managed container in any state (or the claim's), from the node view when it can be
        trusted, else from the engine (see node_view.py). Allocation decisions take theirs from `holders_now`.

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
            containers = tuple(self._record(state) for state in snapshot.containers)
            self._records = {c.id: c for c in containers}
            self._presented = (snapshot, containers)
        return containers

    def listing(self, history: EventHistory) -> tuple[Sequence[ManagedContainer], int]:
        """Every managed container and the history's revision the list is exact at: watching the
        events from it repeats and misses no container's change. Read from the engine (the view not
        trusted) the revision is taken first: a change may then come again, none is missed."""
        revision = history.revision()
        containers = self.list_managed()
        presented_from, presented = self._presented
        if presented is containers and presented_from is not None:
            return containers, presented_from.revision
        return containers, revision

    def _record(self, state: ContainerState) -> ManagedContainer:
        """One ManagedContainer per container while the view's record of it stays the same, listed
        or shown: what a caller derives from one (a route's JSON) it may keep until it gets another."""
        kept = self._records.get(state.id)
        if kept is None or (kept.state is not state and kept.state != state):
            if len(self._records) >= MAX_RECORDS_KEPT:
                self._records = {}
            kept = self._records[state.id] = ManagedContainer.from_state(state)
        return kept

    def holders_now(self, engine: bool = False) -> tuple[Callable[[str], list[Holdings]], bool]:
        """What the managed containers carrying a label (`key` or `key=value`) hold, for a decision
        under the allocation lock, and whether it came from the view: from the node view when it is
        trusted now and shown to hold every change made under the lock (NodeView.snapshot_for_allocation)
        and `engine` is not asked, else from one list of the engine, which at 100 claims costs 9 ms
        of a create's 200. Either shows every container whose create or start went through the
        lock; one made behind the agent's back shows in the view once its event is in."""
        snapshot = None if engine else self.view.snapshot_for_allocation()
        if snapshot is not None:
            held = self._holdings_in(snapshot)
            return (lambda label: [holdings for labels, holdings in held if has_label(labels, label)]), True
        rows = self.managed_rows()
        parsed: dict[str, Holdings] = {}
        return (lambda label: carrying(rows, label, parsed)), False

    def _holdings_in(self, snapshot: Snapshot) -> list[tuple[dict[str, str], Holdings]]:
        """(labels, holdings) of each container in the view; a record unchanged since the last call is not parsed again."""
        known, held = self._held, {}
        for state in snapshot.containers:
            kept = known.get(state.id)
            held[state.id] = kept if kept is not None and kept[0] is state else (state, Holdings.of_state(state))
        self._held = held
        return [(state.labels, holdings) for state, holdings in held.values()]

    def holders_of(self, label: str) -> list[Holdings]:
        """What the managed containers carrying `label` hold, straight from the engine (see
        claims/holders.py), where a view a moment behind will not do. GPU holders are at most about one per GPU."""
        with self._engine.call("list containers") as api:
            rows = api.containers(all=True, filters={"label": [MANAGED_FILTER, label]})
        return [Holdings.of_row(row) for row in rows]

    def stale_created(self, older_than: float) -> list[tuple[str, str]]:
        """(id, claim id) of managed containers created but never started `older_than` seconds ago."""
        with self._engine.call("list containers") as api:
            rows = api.containers(all=True, filters={"label": [MANAGED_FILTER], "status": ["created"]})
        cutoff = time.time() - older_than
        # One the agent stopped before it ever ran is kept, as every stopped claim is.
        return [(row["Id"], (row.get("Labels") or {}).get(CLAIM_LABEL, "")) for row in rows if row["Created"] < cutoff and not Holdings.of_row(row).stopped]

    def waiting_for_volumes(self) -> list[tuple[str, str]]:
        """(id, claim id) of managed containers mounting claim volumes that the engine meant to keep
        running (restart policy always or unless-stopped, not stopped by the agent) but failed to
        start: after a reboot the engine starts them before the agent has mounted their volumes."""
        with self._engine.call("list containers") as api:
            rows = api.containers(all=True, filters={"label": [MANAGED_FILTER, CLAIM_VOLUMES_LABEL], "status": ["exited", "created"]})
        waiting = []
        for row in rows:
            if Holdings.of_row(row).stopped or (info := self.inspect(row["Id"])) is None:
                continue
            policy = ((info.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")
            if policy in ("always", "unless-stopped") and (info.get("State") or {}).get("Error"):
                waiting.append((row["Id"], (row.get("Labels") or {}).get(CLAIM_LABEL, "")))
        return waiting

    def data_root(self) -> str | None:
        """The engine's data root (`DockerRootDir`), which no volume may reach; None while the engine
        does not say."""
        try:
            return self.storage().data_root or None
        except EngineUnavailable:
            return None

    def storage(self) -> EngineStorage:
        """The engine's data root and storage driver. Read once: they change only when dockerd
        restarts with another configuration."""
        if self._storage is None:
            self._storage = read_storage(self._engine)
        return self._storage

    def writable_layer(self, container_id: str) -> str | None:
        """The directory of the container's writable layer: overlay2's UpperDir (what the container
        wrote), or btrfs' subvolume (the image's files too, as the engine's size counts them there).
        None when the container is gone or its driver keeps no such directory."""
        info = self.inspect(container_id)
        if info is None:
            return None
        data = (info.get("GraphDriver") or {}).get("Data") or {}
        if data.get("UpperDir"):
            return data["UpperDir"]
        storage = self.storage()
        if storage.driver != "btrfs":
            return None
        try:
            mount_id = (Path(storage.data_root) / "image" / "btrfs" / "layerdb" / "mounts" / info["Id"] / "mount-id").read_text().strip()
        except OSError:
            return None
        return str(Path(storage.data_root) / "btrfs" / "subvolumes" / mount_id) if mount_id else None

    def find_claim(self, claim_id: str, fresh: bool = False) -> str | None:
        """The id of the claim's container, if it has one: the node view when trusted, else the
        engine's list filtered by the claim's label (small, whatever the number of claims)."""
        snapshot = None if fresh else self.view.snapshot()
        if snapshot is not None:
            return next((s.id for s in snapshot.labelled(CLAIM_LABEL, claim_id)), None)
        holder = self.claim_holder(claim_id)
        return holder.container_id if holder is not None else None

    def claim_holder(self, claim_id: str) -> Holdings | None:
        """What the claim's container holds (its id and spec digest among it), straight from the engine."""
        holders = self.holders_of(f"{CLAIM_LABEL}={claim_id}")
        return holders[0] if holders else None

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
                return self._record(matches[0])
        try:
            with self._engine.call("inspect container") as api:
                info = api.inspect_container(container_id)
        except (EngineNotFound, EngineRefusal, EngineFailure) as exc:
            if not isinstance(exc, EngineNotFound) and AMBIGUOUS_PREFIX not in exc.reason.lower():
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
        with self._engine.call("list containers") as api:
            return api.containers(all=True, filters={"label": labels})

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        """The engine's inspect of one container; None once it is gone."""
        try:
            with self._engine.call("inspect container") as api:
                return api.inspect_container(container_id)
        except EngineNotFound:
            return None

    def managed_events(self, since_ns: int | None, actions: Iterable[str]) -> EventStream:
        """The engine's events of managed containers from `since_ns` (engine time) on, on a connection
        of their own that never times out; `close()` ends the stream."""
        return self._engine.events(since_ns, {"type": ["container"], "label": [MANAGED_FILTER], "event": list(actions)})

    # --- logs (logs.py) and processes ----------------------------------------------------------

    def logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> bytes:
        return container_logs.read_logs(self._engine, container_id, tail=tail, since=since, timestamps=timestamps)

    def follow_logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> LogStream:
        return container_logs.follow_logs(self._engine, container_id, tail=tail, since=since, timestamps=timestamps)

    def container_pid(self, container_id: str) -> int:
        """The host PID of the container's main process; 0 when it is not running or gone."""
        try:
            with self._engine.call("inspect container") as api:
                return int(api.inspect_container(container_id)["State"].get("Pid") or 0)
        except EngineNotFound:
            return 0

    # --- exec (exec.py) -------------------------------------------------------------

    def create_exec(self, container_id: str, command: list[str], *, env: list[str] | None = None, working_dir: str = "",
                    stdin: bool = False, tty: bool = False) -> str:
        return container_exec.create_exec(self._engine, container_id, command, env=env, working_dir=working_dir, stdin=stdin, tty=tty)

    def start_exec(self, container_id: str, exec_id: str, tty: bool = False) -> EngineExec:
        return container_exec.start_exec(self._engine, container_id, exec_id, tty)

    # --- images ----------------------------------------------------------------------

    def present_image(self, image: str) -> PresentImage | None:
        """The image as the engine holds it (its id and labels), or None when it does not."""
        try:
            with self._engine.call("inspect image") as api:
                info = api.inspect_image(image)
        except EngineNotFound:
            return None
        return PresentImage(info["Id"], (info.get("Config") or {}).get("Labels") or {})

    def pull(self, image: str, on_event: Callable[[dict[str, Any]], None], auth: RegistryAuth | None = None) -> None:
        """Pull `image` within the pull and no-progress timeouts, each progress event to `on_event`;
        with `auth`, as that registry user (for this request only)."""
        stream_pull(self._engine.api("pull image"), image, self._config, on_event, auth)

    def list_images(self) -> list[HeldImage]:
        """Every image the engine holds (one list call)."""
        with self._engine.call("list images") as api:
            rows = api.images()
        return [HeldImage(row["Id"], tuple(tag for tag in row.get("RepoTags") or () if tag != "<none>:<none>"), int(row.get("Size") or 0))
                for row in rows]

    def images_in_use(self) -> dict[str, list[str]]:
        """Image id -> the claims of the containers made from it, for every container in any state,
        the agent's or not (an unmanaged container's claim is "")."""
        with self._engine.call("list containers") as api:
            rows = api.containers(all=True)
        used: dict[str, list[str]] = {}
        for row in rows:
            used.setdefault(row.get("ImageID", ""), []).append((row.get("Labels") or {}).get(CLAIM_LABEL, ""))
        return used

    def remove_image(self, reference: str) -> None:
        """Untag `reference` (the image goes with its last reference); never forced, so the engine
        refuses while any container, running or not, was made from it (EngineConflict)."""
        with self._engine.call("remove image") as api:
            api.remove_image(reference)

    def image_store_usage(self) -> tuple[int, int] | None:
        """(bytes used, bytes in all) of the filesystem holding the engine's data root; None while
        the engine does not say where that is."""
        root = self.data_root()
        if root is None:
            return None
        stat = os.statvfs(root)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize, stat.f_blocks * stat.f_frsize

    def check_registry_access(self, image: str, auth: RegistryAuth) -> None:
        """Raise ImageUnavailable unless the registry lets `auth` pull `image` (a manifest, no layers)."""
        check_access(self._engine.api("check image"), image, auth, self._config)

    # --- creating and removing -------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; its labels record the claim, GPUs and ports. The caller
        holds the allocation lock: allocation lists the engine until the view shows the container (NodeView.changed_under_lock)."""
        api = self._engine.api("create container")
        arguments = create_arguments(api, spec, self._config)
        try:
            with self._engine.call("create container"):
                created = api.create_container(**arguments)
        except EngineConflict:
            holder = self.claim_holder(spec.claim_id)
            if holder is None:
                raise Conflict(f"the container name {spec.name} is taken by a container the agent does not manage") from None
            raise ClaimExists.held_by(spec.claim_id, holder.container_id, holder.spec_digest == spec.spec_digest) from None
        except (EngineRefusal, EngineNotFound) as exc:
            raise EngineRejected(f"the engine refused the container: {exc.message}") from None
        except (EngineUnavailable, EngineFailure):
            self.remove_if_created(spec.name)
            raise
        self.view.changed_under_lock(created["Id"])
        return created["Id"]

    def remove_if_created(self, name: str, wait_seconds: float = 0.0) -> bool:
        """Remove the container `name` should the engine have made it, after a create whose answer
        never came back: it timed out, or the worker that sent it died (then wait up to
        `wait_seconds` for the engine to finish making it). The caller holds the allocation lock,
        so the container never holds GPUs nobody knows about. True when there was one."""
        give_up = time.monotonic() + wait_seconds
        try:
            while True:
                try:
                    with self._engine.call("remove container") as api:
                        api.remove_container(name, v=True, force=True)
                    return True
                except (EngineNotFound, EngineConflict):
                    if time.monotonic() >= give_up:
                        return False
                    time.sleep(0.05)
        except AgentError:
            log.error("a create's container %s could not be checked after its answer was lost; remove it by hand", name)
            return False
        finally:
            self.view.request_resync()

    def start(self, container_id: str, before: ContainerState | None = None) -> None:
        """Start a created container (or, given its record `before`, a stopped one); a port the engine cannot bind is PortTaken."""
        try:
            with self._engine.call("start container") as api:
                api.start(container_id)
        except (EngineRefusal, EngineConflict, EngineNotFound, EngineFailure) as exc:
            if any(text in exc.reason for text in PORT_TAKEN):
                raise PortTaken(f"a host port is already taken on the node: {exc.reason}") from None
            if isinstance(exc, EngineFailure):
                raise
            raise EngineRejected(f"the container did not start: {exc.reason}") from None
        self.view.await_started(container_id, before)

    def remove(self, container_id: str, grace_seconds: int | None = None) -> None:
        """Stop within the grace period, then remove with its anonymous volumes."""
        api = self._engine.api("remove container")
        grace = self._config.stop_timeout if grace_seconds is None else grace_seconds
        try:
            if grace > 0:
                with self._engine.call("stop container"):
                    api.stop(container_id, timeout=grace)
            with self._engine.call("remove container"):
                api.remove_container(container_id, v=True, force=True)
        except EngineNotFound:  # gone already
            pass
        except EngineConflict:  # another request is removing it
            return
        self.view.await_removed(container_id)

    # --- stopping and starting again (allocation/stopping.py decides) ---------------------

    def mark_stopped(self, container: ManagedContainer, reason: str) -> StopMark:
        """Rename the container to carry a stop mark, and set its restart policy to `no`: from here
        the engine never starts it on its own (its own restart or the node's reboot included), and
        once it no longer runs it holds no GPU, port or CPU (claims/records.Holdings). A container
        marked already (a stop retried, or one that crashed halfway) keeps the policy it recorded."""
        info = self._inspect_or_gone(container.id)
        mark = StopMark.parse(info.get("Name", "").lstrip("/"), container.claim_id)
        if mark is None:
            policy = ((info.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name") or "no"
            mark = StopMark(reason, policy)
        with self._engine.call("update container") as api:
            api.update_container(container.id, restart_policy={"Name": "no"})
        self._rename(container.id, info, mark.name(container.claim_id))
        return mark

    def unmark_stopped(self, container: ManagedContainer, mark: StopMark) -> ContainerState:
        """Give the container back its claim's name and the restart policy it had before its stop:
        from here it holds what it was made with again, running or not. The caller holds the
        allocation lock: allocation lists the engine until the view shows it started (NodeView.changed_under_lock).
        Returns the container as the engine showed it just before: what its start's wait must see
        it started after, never a record of the view (which may still show the run before its stop)."""
        info = self._inspect_or_gone(container.id)
        self.view.changed_under_lock(None)  # said before too: a worker killed right after the rename leaves it said
        try:
            self._rename(container.id, info, container_name(container.claim_id))
        finally:  # a rename that timed out may still have been made
            self.view.changed_under_lock(container.id)
        if mark.restart_policy != "no":
            with self._engine.call("update container") as api:
                api.update_container(container.id, restart_policy={"Name": mark.restart_policy})
        return ContainerState.from_inspect(info)

    def stop(self, container_id: str, grace_seconds: int | None = None) -> None:
        """Stop the container within the grace period (then SIGKILL), and keep it."""
        grace = self._config.stop_timeout if grace_seconds is None else grace_seconds
        try:
            with self._engine.call("stop container") as api:
                api.stop(container_id, timeout=grace)
        except EngineNotFound:
            raise NotManaged(f"no managed container {container_id!r}") from None
        self.view.await_stopped(container_id)

    def _inspect_or_gone(self, container_id: str) -> dict[str, Any]:
        info = self.inspect(container_id)
        if info is None:
            raise NotManaged(f"no managed container {container_id!r}")
        return info

    def _rename(self, container_id: str, info: dict[str, Any], name: str) -> None:
        if info.get("Name", "").lstrip("/") == name:
            return
        try:
            with self._engine.call("rename container") as api:
                api.rename(container_id, name)
        except EngineConflict:
            raise Conflict(f"the container name {name} is taken by another container") from None

    def delete_managed(self, container_id: str) -> ManagedContainer:
        """Remove a managed container; any other id is 404 and left alone."""
        container = self.get_managed(container_id)
        self.remove(container.id)
        return container
