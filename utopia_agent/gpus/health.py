"""What state each GPU is in, its quarantine, and the one health watcher per node.

A GPU's state, by UUID, in order of precedence:

  lost         NVML reports it failing (GPU is lost, or no readable UUID)
  quarantined  recorded in STATE_DIR/gpu-health.json with its reason: never given until released
  allocated    a managed container holds it (the engine's labels say so)
  releasing    no container holds it, but NVML shows compute processes or memory above idle
  free         none of these: the only state the allocator gives

There is one meaning of busy everywhere: not free. The allocator, /api/v1/gpus, the metrics
and the scrape all derive states through `views_of`.

Quarantine is kept with its reason in the state dir, shared by every worker and across
restarts, and written under the allocation lock. Critical Xids, double-bit ECC errors, pending
page retirement or row remapping and failed row remapping quarantine a GPU until the operator
releases it; a GPU still dirty UTOPIA_AGENT_GPU_RELEASE_SECONDS after its claim ended is
quarantined for `stray processes` and released by itself once NVML shows it clean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..engine.manager import DockerManager
from ..errors import AgentError, GpuHeld, GpuNotFound
from ..events.changes import gpu_change
from ..events.history import EventHistory
from ..schemas import GpuSchema
from .sampler import GpuSample, GpuSampler
from .inventory import GpuEvent, GpuEvents, GpuFacts, GpuStatus
from ..claims.holders import gpu_claims, gpu_holder
from ..node.chore import RoleJob
from ..claims.records import GPU_IDS_LABEL, ManagedContainer
from ..node.state_file import StateFile

log = logging.getLogger("utopia_agent.gpu_health")

# Xids that are the application's fault (NVIDIA's k8s device plugin skips the same ones):
# a bad memory access, a page fault, a preempted context... The GPU itself is fine.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
RECENT_XIDS = 16
STRAY_PROCESSES = "stray processes"
# Counters whose rise quarantines a GPU, with what the quarantine says.
COUNTER_QUARANTINES = (
    ("ecc_dbe_volatile", "double-bit ECC errors"),
    ("retired_pages_pending", "retired pages pending: reset the GPU"),
    ("row_remap_pending", "row remapping pending: reset the GPU"),
    ("row_remap_failure", "row remapping failed"),
)
MONITOR_CHECK_SECONDS = 1.0
_gpu = GpuSchema()


@dataclass(frozen=True)
class GpuView:
    """One GPU as the API shows it: what it is, its state, and why."""

    status: GpuStatus
    facts: GpuFacts | None
    state: str
    claim_id: str | None
    reason: str | None
    xid_events: list[dict[str, int]]


def views_of(sample: GpuSample | None, facts: list[GpuFacts], holders: Mapping[str, str], records: dict[str, Any]) -> list[GpuView]:
    """Every GPU of the sample with its state; the single definition of the states."""
    if sample is None:
        return []
    facts_by_index = {f.index: f for f in facts}
    quarantined = records.get("quarantined", {})
    xids = records.get("xid_events", {})
    views = []
    for gpu in sample.gpus:
        claim = gpu_holder(gpu, holders)
        quarantine = quarantined.get(gpu.uuid) if gpu.uuid else None
        if not gpu.healthy:
            state, reason = "lost", "NVML reports the GPU lost" if gpu.uuid else "NVML cannot read the GPU's UUID"
        elif quarantine is not None:
            state, reason = "quarantined", quarantine["reason"]
        elif claim is not None:
            state, reason = "allocated", None
        elif gpu.uuid in sample.dirty:
            state, reason = "releasing", sample.dirty[gpu.uuid]
        else:
            state, reason = "free", None
        views.append(GpuView(gpu, facts_by_index.get(gpu.index), state, claim, reason, list(xids.get(gpu.uuid, []))))
    return views


class GpuHealth:
    """GPU states for this worker's requests, and the operator's quarantine."""

    def __init__(self, state_dir: Path, sampler: GpuSampler, docker: DockerManager, lock: Callable[[], AbstractContextManager], release_seconds: float,
                 history: EventHistory):
        self.sampler = sampler
        self._history = history
        self.records = StateFile(state_dir / "gpu-health.json")
        self._docker = docker
        self._lock = lock
        self._listed: tuple[Sequence[ManagedContainer] | None, Mapping[str, str]] = (None, {})
        self.monitor = HealthMonitor(self, state_dir / "gpu-monitor.lock", release_seconds, StateFile(state_dir / "gpu-conditions.json"))

    def facts(self) -> list[GpuFacts]:
        inventory = self.sampler.inventory
        return inventory.facts() if inventory is not None else []

    def views(self, holders: Mapping[str, str] | None = None, sample: GpuSample | None = None) -> list[GpuView]:
        """Every GPU as of `sample` (by default the last); holders default to the listing of managed containers."""
        if holders is None:
            holders = self.listed_holders()
        return views_of(sample or self.sampler.latest(), self.facts(), holders, self.records.read())

    def listed_holders(self, containers: Sequence[ManagedContainer] | None = None) -> Mapping[str, str]:
        """Who holds which GPU, from the listing of managed containers (served from memory when
        exact), or from `containers`, a listing the caller has; derived once per listing, since
        the view hands out the same one until something changes. While the view is not trusted (a
        watcher held up by a slow engine, in a burst of creates) it is one list call of the GPU
        holders, where listing every container would inspect each, on every poll of the metrics."""
        if containers is None:
            if self._docker.view.snapshot() is None:
                return self.fresh_holders()
            containers = self._docker.list_managed()
        listed = self._listed
        if listed[0] is not containers:
            listed = self._listed = (containers, MappingProxyType(gpu_claims(container.holdings for container in containers)))
        return listed[1]

    def fresh_holders(self) -> dict[str, str]:
        """Who holds which GPU, straight from the engine: what decisions under the lock use."""
        return gpu_claims(self._docker.holders_of(GPU_IDS_LABEL))

    def view(self, uuid: str) -> GpuView:
        for view in self.views():
            if view.status.uuid == uuid:
                return view
        raise GpuNotFound(f"no GPU with UUID {uuid!r} on this node")

    def quarantine(self, uuid: str, reason: str) -> GpuView:
        """The operator's quarantine: it replaces any other, and only the operator releases it."""
        self.view(uuid)
        self.record_quarantine(uuid, reason, source="operator", replace=True)
        return self.view(uuid)

    def release(self, uuid: str) -> GpuView:
        """Lift the quarantine (409 while a claim holds the GPU). The counters it shows now are
        acknowledged, so only a further rise quarantines it again."""
        self.view(uuid)
        sample = self.sampler.latest()
        with self._lock():
            records = self.records.read()
            if uuid in records.get("quarantined", {}):
                claim = self.fresh_holders().get(uuid)
                if claim is not None:
                    raise GpuHeld(f"GPU {uuid} is held by claim {claim}; delete its container first", claim_id=claim)
                lifted = records["quarantined"].pop(uuid)
                records.setdefault("acknowledged", {})[uuid] = _counters_of(sample, uuid)
                self.records.write_announced(records, lambda: self._record_change(uuid))
                log.warning("gpu quarantine released by the operator uuid=%s was=%s", uuid, lifted["reason"], extra={"gpu_uuid": uuid})
        return self.view(uuid)

    def record_quarantine(self, uuid: str, reason: str, source: str, automatic_release: bool = False, replace: bool = False) -> bool:
        """Quarantine `uuid` (see _quarantine_in); True when recorded. Idempotent, so every worker
        may come to the same conclusion."""
        with self._lock():
            records = self.records.read()
            if not _quarantine_in(records, uuid, reason, source, automatic_release, replace):
                return False
            self.records.write_announced(records, lambda: self._record_change(uuid))
        log.warning("gpu quarantined uuid=%s source=%s reason=%s", uuid, source, reason, extra={"gpu_uuid": uuid})
        return True

    def record_event(self, event: GpuEvent) -> None:
        """Keep an Xid among the GPU's recent ones, and quarantine the GPU unless it is the application's."""
        critical = event.kind != "xid" or event.code not in APPLICATION_XIDS
        reason = f"Xid {event.code}" if event.kind == "xid" else "double-bit ECC error"
        with self._lock():
            records = self.records.read()
            if event.kind == "xid":
                recent = records.setdefault("xid_events", {}).setdefault(event.uuid, [])
                recent.append({"time": int(time.time()), "code": event.code})
                del recent[:-RECENT_XIDS]
            newly = critical and _quarantine_in(records, event.uuid, reason, event.kind)
            self.records.write_announced(records, lambda: newly and self._record_change(event.uuid))
        level = logging.WARNING if critical else logging.INFO
        outcome = "quarantined" if newly else "already quarantined" if critical else "application error, not quarantined"
        log.log(level, "gpu event uuid=%s %s: %s", event.uuid, reason, outcome, extra={"gpu_uuid": event.uuid})

    def lift_automatic(self, uuid: str) -> None:
        """Release a quarantine that allows it (stray processes), now that NVML shows the GPU clean."""
        with self._lock():
            records = self.records.read()
            quarantine = records.get("quarantined", {}).get(uuid)
            if quarantine is None or not quarantine.get("automatic_release"):
                return
            del records["quarantined"][uuid]
            self.records.write_announced(records, lambda: self._record_change(uuid))
        log.warning("gpu recovered uuid=%s was=%s", uuid, quarantine["reason"], extra={"gpu_uuid": uuid})

    def _record_change(self, uuid: str) -> None:
        """Put the GPU's new state in the history; the caller holds the allocation lock and wrote the change."""
        self.record_states({uuid})

    def record_states(self, uuids: set[str], sample: GpuSample | None = None) -> None:
        """Put these GPUs' states, as GET /api/v1/gpus shows them now, in the history."""
        changes = [gpu_change(view.state, _gpu.dump(view)) for view in self.views(sample=sample) if view.status.uuid in uuids]
        self._history.record(changes)

    def close(self) -> None:
        """Stop the watcher, then the sampler (which shuts NVML down)."""
        self.monitor.close()
        self.sampler.close()


def _quarantine_in(records: dict[str, Any], uuid: str, reason: str, source: str, automatic_release: bool = False, replace: bool = False) -> bool:
    """Record a quarantine in `records` unless the GPU has one already; True when recorded.
    `replace` (the operator) always records; a quarantine only the operator may lift always
    replaces one that would lift itself, so a faulty GPU is never released as merely dirty."""
    quarantined = records.setdefault("quarantined", {})
    existing = quarantined.get(uuid)
    if existing is not None and not replace and (automatic_release or not existing.get("automatic_release")):
        return False
    quarantined[uuid] = {"reason": reason, "source": source, "since": int(time.time()), "automatic_release": automatic_release}
    return True


def _counters_of(sample: GpuSample | None, uuid: str) -> dict[str, int]:
    if sample is None:
        return {}
    for gpu in sample.gpus:
        if gpu.uuid == uuid and gpu.index in sample.counters:
            return {name: value for name, value in asdict(sample.counters[gpu.index]).items() if value is not None}
    return {}


class HealthMonitor(RoleJob):
    """The node's one GPU health watcher: NVML events, the memory-health counters, releases.

    Every worker starts one; the one that holds the flock on STATE_DIR/gpu-monitor.lock does the
    work and the others wait for its lock, so when that worker dies another takes over at once.
    NVML gives every event to every process that registered for it: with one watcher per node
    each event is recorded once. Events that come while no worker watches (a hand-over) are not
    seen; the counters, read again by the next watcher, still show double-bit ECC errors.
    """

    def __init__(self, health: GpuHealth, lock_path: Path, release_seconds: float, conditions: StateFile):
        super().__init__(lock_path.stem, lock_path.parent)
        self._health = health
        self._told_conditions = conditions
        self._release_seconds = release_seconds
        self._pending: list[GpuEvent] = []
        self._dirty_since: dict[str, float] = {}
        self._last_claim: dict[str, str] = {}
        # What NVML last showed of each GPU ("lost", "dirty" or ""), as told to the history; read from
        # the state dir at this watcher's first check, so a takeover or a restart tells no change twice.
        self._conditions: dict[str, str] | None = None
        self._next_check = 0.0

    def close(self) -> None:
        super().close()
        if self._role.held:  # a worker that does not watch sleeps in flock: nothing to wait for
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        events: GpuEvents | None = None
        opened = False
        try:
            while self._await_role():  # asleep in the kernel while another worker watches
                inventory = self._health.sampler.inventory
                if inventory is None:  # NVML still opening
                    self._closed.wait(MONITOR_CHECK_SECONDS)
                else:
                    if not opened:
                        events, opened = self._open_events(inventory), True
                    self._watch_once(events)
        finally:
            if events is not None:
                events.close()
            self._role.release()

    def _watch_once(self, events: GpuEvents | None) -> None:
        """Wait up to about a second for an event, record what came, and run the checks when due."""
        try:
            if events is None:
                self._closed.wait(MONITOR_CHECK_SECONDS)
            elif (event := events.wait()) is not None:
                self._pending.append(event)
            self._record_pending()
            if time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + MONITOR_CHECK_SECONDS
                self._check()
        except AgentError as error:  # the allocation lock stayed busy, or the engine is away
            log.warning("gpu health check deferred: %s", error.message)
            self._closed.wait(MONITOR_CHECK_SECONDS)
        except Exception:
            log.exception("gpu health check failed")
            self._closed.wait(MONITOR_CHECK_SECONDS)

    def _open_events(self, inventory) -> GpuEvents | None:
        try:
            events = inventory.open_events()
        except Exception as exc:  # NVML without event support: the counters still show ECC errors
            log.warning("NVML events unavailable (%s); reading the memory-health counters only", exc)
            return None
        if events is not None:
            log.info("watching NVML events on %d GPUs", events.watched)
        return events

    def _record_pending(self) -> None:
        while self._pending:
            event = self._pending[0]
            if event.uuid is None:
                log.warning("NVML event %s %d on a device the agent does not know", event.kind, event.code)
            else:
                self._health.record_event(event)
            self._pending.pop(0)

    def _check(self) -> None:
        """Quarantine on counters, time releases, and lift quarantines that allow it once clean."""
        sampler = self._health.sampler
        sample = sampler.latest()
        if sample is None or sampler.hung():
            return
        self._note_conditions(sample)
        records = self._health.records.read()
        quarantined = records.get("quarantined", {})
        acknowledged = records.get("acknowledged", {})
        for gpu in sample.gpus:
            counters = sample.counters.get(gpu.index)
            for_operator = gpu.uuid in quarantined and not quarantined[gpu.uuid].get("automatic_release")
            if gpu.uuid and counters is not None and not for_operator:  # vars: plain values, read only (asdict copies deep, each second)
                self._check_counters(gpu.uuid, vars(counters), acknowledged.get(gpu.uuid, {}))
        dirty = {uuid: why for uuid, why in sample.dirty.items() if uuid not in quarantined}
        recoverable = [
            uuid for uuid, quarantine in quarantined.items()
            if quarantine.get("automatic_release") and uuid not in sample.dirty and quarantine["since"] < sample.taken_at
            and any(gpu.uuid == uuid and gpu.healthy for gpu in sample.gpus)
        ]
        if not dirty and not recoverable and not self._dirty_since:
            return
        holders = self._health.listed_holders()
        self._time_releases(dirty, holders)
        for uuid in recoverable:
            if uuid not in holders:
                self._health.lift_automatic(uuid)

    def _note_conditions(self, sample: GpuSample) -> None:
        """Put a GPU's state in the history when NVML starts or stops showing it lost or dirty."""
        conditions = {gpu.uuid: "lost" if not gpu.healthy else "dirty" if gpu.uuid in sample.dirty else "" for gpu in sample.gpus if gpu.uuid}
        known = self._conditions if self._conditions is not None else self._told_conditions.read()
        changed = {uuid for uuid, now in conditions.items() if known.get(uuid, "") != now}
        if changed:
            self._health.record_states(changed, sample)  # on a full disk this fails, and the next check tells it again
        self._conditions = conditions
        if changed:
            self._told_conditions.write(conditions, durable=False)

    def _check_counters(self, uuid: str, counters: dict[str, int | None], acknowledged: dict[str, int]) -> None:
        for name, what in COUNTER_QUARANTINES:
            value = counters.get(name)
            if value is not None and value > acknowledged.get(name, 0):
                reason = f"{what} ({value})" if name == "ecc_dbe_volatile" else what
                self._health.record_quarantine(uuid, reason, source="counters")
                return

    def _time_releases(self, dirty: dict[str, str], holders: Mapping[str, str]) -> None:
        """A GPU no claim holds that stays dirty for the release time is quarantined."""
        now = time.monotonic()
        self._last_claim.update({key: claim for key, claim in holders.items() if not key.startswith("#")})
        for uuid in list(self._dirty_since):
            if uuid not in dirty or uuid in holders:
                del self._dirty_since[uuid]
        for uuid, why in dirty.items():
            if uuid in holders:
                continue
            if uuid not in self._dirty_since:
                self._dirty_since[uuid] = now
                log.info("gpu releasing uuid=%s after=%s: %s", uuid, self._last_claim.get(uuid, "-"), why, extra={"gpu_uuid": uuid})
            elif now - self._dirty_since[uuid] >= self._release_seconds:
                ended = f"claim {self._last_claim[uuid]} ended" if uuid in self._last_claim else "release"
                reason = f"{STRAY_PROCESSES}: {why} {self._release_seconds:g} s after {ended}"
                self._health.record_quarantine(uuid, reason, source="release", automatic_release=True)
                del self._dirty_since[uuid]
