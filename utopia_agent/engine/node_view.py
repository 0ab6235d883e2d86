"""One exact view of the node's managed containers, kept by one watcher and read by every worker.

The model is Kubernetes' informer: one list, then the engine's event stream, each event
re-reading (inspecting) only the container it names. One worker per node watches: the one
that holds a flock on STATE_DIR/view.lock. It writes the view to STATE_DIR/view.jsonl (JSON
lines in a new file renamed into place, so a reader gets the old view or the new one) and
publishes its state in a few words that every worker maps (STATE_DIR/view.state): a
generation bumped after each write, whether the view is live, until when the watcher vouches
for it, and a resync request. Readers re-read the file only when the generation moved, and
read the engine itself whenever the view cannot be trusted.

Why a file for the records and not shared memory: the view grows and shrinks with the node,
a rename replaces it whole without making readers lock, and it outlives the agent. A
restarted agent, or the worker that takes over from a watcher that died, resumes the event
stream from the view's last event (`since`) and checks the view against one list call, so it
inspects only the containers that changed meanwhile, never every container.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Iterable

from ..claims.records import CLAIM_LABEL, ContainerState, StopMark
from .event_feed import EventFeed, StreamEnded
from ..events.changes import container_changes, exit_line
from ..events.history import EventHistory

log = logging.getLogger("utopia_agent.view")

# Engine events that change what an inspect of the container shows.
VIEW_EVENTS = ("create", "start", "restart", "die", "oom", "pause", "unpause", "rename", "update", "destroy")
# While no event comes, the watcher proves this often that the engine still answers...
HEARTBEAT_SECONDS = 1.0
# ...and the view is trusted this long after the last proof (as /health trusts a recent answer):
# a hung engine sends no event and no error, only silence.
TRUST_SECONDS = 2.0
TRUST_NS = int(TRUST_SECONDS * 1e9)
# A list call compared with the view now and then, though the event stream said nothing changed.
RESYNC_SECONDS = 60.0
RECONNECT_SECONDS = 1.0
# Tokens of changes whose wait never saw them (a container left created and never started) are forgotten past this many.
MAX_ACKS = 4096
# Readers waiting out a sync (after a restart: one inspect per changed container, seconds at
# times, every request thread of every worker waiting) poll the header this often...
SYNC_POLL_SECONDS = 0.002
# ...and a create or delete waits for its own change in the view (a few ms) polling this often.
CHANGE_POLL_SECONDS = 0.001

DOWN, SYNCING, LIVE = 0, 1, 2


class Snapshot:
    """One published view: its generation, the last event it includes, the containers newest first.

    On disk it is JSON lines: a header, then one container per line, each line starting with the
    container's id. A reader parses a line only when asked for it, and keeps the records of the
    lines that did not change since its last snapshot: right after a change, showing one container
    finds its line in the file's bytes and parses that line alone (indexing every line costs 54 µs
    at 100 containers, finding one 5 µs), and listing builds only the records that changed.

    A line is found by a newline followed by `{"id": "<id>`, never by the text alone: a label
    named `id` (an image's, so the tenant's) is written as `{"id": "...` inside another line,
    while a newline byte only ever ends a line (JSON escapes those inside strings).
    """

    def __init__(self, generation: int, event_ns: int, body: bytes, count: int, previous: Snapshot | None = None, revision: int = 0):
        self.generation = generation
        self.event_ns = event_ns
        # The history's revision when it was written: every container change up to it is in, none after.
        self.revision = revision
        self._body = body  # the container lines, each after a newline (the header's, for the first)
        self._count = count
        known = previous._parsed() if previous is not None else {}
        if len(known) > 2 * count:  # records only shown, never listed, pile up: keep the current ones
            current = set(self._lines.values())
            known = {line: record for line, record in known.items() if line in current}
        self._known = known
        self._records: dict[str, ContainerState] = {}
        self._found: dict[str, bytes] = {}  # lines found without the index, by id

    @classmethod
    def of(cls, generation: int, event_ns: int, containers: tuple[ContainerState, ...], previous: Snapshot | None = None, revision: int = 0) -> Snapshot:
        """The snapshot of these records; a record `previous` holds (the same object) keeps its line."""
        kept = previous._records if previous is not None else {}
        lines = {c.id: previous._lines[c.id] if kept.get(c.id) is c else _line(c) for c in containers}
        snapshot = cls(generation, event_ns, b"".join(b"\n" + line for line in lines.values()) + b"\n", len(lines), revision=revision)
        snapshot.__dict__.update(_lines=lines, containers=containers)
        snapshot._records = {c.id: c for c in containers}
        return snapshot

    @classmethod
    def read(cls, path: Path, previous: Snapshot | None = None) -> Snapshot:
        data = path.read_bytes()
        header_end = data.index(b"\n")
        meta, body = json.loads(data[:header_end]), data[header_end:]
        count = meta["containers"] if "containers" in meta else body.count(b"\n") - 1  # written by an agent before the count
        return cls(meta["generation"], meta["event_ns"], body, count, previous, meta.get("revision", 0))

    def write(self, path: Path) -> None:
        """Write beside the view and rename over it: readers see the old view or this one."""
        header = json.dumps({"generation": self.generation, "event_ns": self.event_ns, "containers": self._count, "revision": self.revision}).encode()
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_bytes(header + self._body)
        except OSError:
            temporary.unlink(missing_ok=True)  # a full disk: the old view stays, and the space comes back
            raise
        os.replace(temporary, path)

    @cached_property
    def _lines(self) -> dict[str, bytes]:
        """Every line by its container's id, in the view's order: built only to list."""
        return {line[_ID_AT:line.index(b'"', _ID_AT)].decode(): line for line in self._body.split(b"\n") if line}

    @cached_property
    def containers(self) -> tuple[ContainerState, ...]:
        known, self._known = self._known, {}
        containers = tuple(self._records.get(cid) or known.get(line) or _parse(line) for cid, line in self._lines.items())
        self._records = {c.id: c for c in containers}
        return containers

    def _parsed(self) -> dict[bytes, ContainerState]:
        """Records already built, by their line: this snapshot's and those it inherited."""
        lines = self._lines if "_lines" in self.__dict__ else self._found  # every record's line is in one of them
        return {**self._known, **{lines[cid]: record for cid, record in self._records.items()}}

    def _line_of(self, container_id: str) -> bytes | None:
        """The container's line, from the index when there is one, else found in the bytes."""
        if "_lines" in self.__dict__:
            return self._lines.get(container_id)
        line = self._found.get(container_id)
        if line is None:
            at = self._body.find(_LINE_START + b'%s"' % container_id.encode()) + 1
            if at == 0:
                return None
            line = self._found[container_id] = self._body[at:self._body.index(b"\n", at)]
        return line

    def get(self, container_id: str) -> ContainerState | None:
        """One record, its line parsed once per snapshot (and not at all when it did not change)."""
        record = self._records.get(container_id)
        if record is None:
            line = self._line_of(container_id)
            if line is None:
                return None
            record = self._records[container_id] = self._known.get(line) or _parse(line)
        return record

    def with_prefix(self, prefix: str) -> list[ContainerState]:
        """The containers whose id starts with `prefix`, found in the bytes (an id begins its line)."""
        needle, ids = _LINE_START + prefix.encode(), []
        at = self._body.find(needle)
        while at >= 0:
            id_at = at + len(_LINE_START)
            ids.append(self._body[id_at:self._body.index(b'"', id_at)].decode())
            at = self._body.find(needle, id_at)
        return [self.get(container_id) for container_id in ids]

    def labelled(self, key: str, value: str) -> list[ContainerState]:
        """The containers whose label `key` is `value`; only lines that mention the pair are parsed."""
        pair, body, found = json.dumps({key: value})[1:-1].encode(), self._body, []
        at = body.find(pair)
        while at >= 0:
            start, end = body.rfind(b"\n", 0, at) + 1, body.index(b"\n", at)
            if (record := _parse(body[start:end])).labels.get(key) == value:
                found.append(record)
            at = body.find(pair, end)
        return found


_ID_AT = len(b'{"id": "')
_LINE_START = b'\n{"id": "'


def _line(container: ContainerState) -> bytes:
    """One container's line of the view file; it starts with its id (see Snapshot.read)."""
    return json.dumps(container.to_json()).encode()


def _parse(line: bytes) -> ContainerState:
    return ContainerState.from_json(json.loads(line))


class ViewEngine(Protocol):
    """The engine calls the view needs (DockerManager provides them); failures raise."""

    def managed_rows(self) -> list[dict[str, Any]]: ...

    def inspect(self, container_id: str) -> dict[str, Any] | None: ...

    def managed_events(self, since_ns: int | None, actions: Iterable[str]) -> Any: ...

    def ping(self) -> None: ...


class _Header:
    """A few words shared by every worker through a mapped file; each word has one writer.

    The watcher writes the generation, state, deadline and the two *_done words; any worker
    writes resync_asked and allocation_asked. Each word is 8 aligned bytes, written and read
    whole, so a reader sees it old or new.
    """

    SIZE = 64
    GENERATION, STATE, DEADLINE, RESYNC_ASKED, RESYNC_DONE, ALLOCATION_ASKED, ALLOCATION_DONE = (8 * i for i in range(7))

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.SIZE)  # blocks, not a hole: a store into a hole of a full filesystem is SIGBUS
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)

    def get(self, offset: int) -> int:
        return struct.unpack_from("Q", self._map, offset)[0]

    def set(self, offset: int, value: int) -> None:
        struct.pack_into("Q", self._map, offset, value)

    def close(self) -> None:
        self._map.close()


class NodeView:
    """What every worker reads; the worker that volunteers also watches, when no one else does."""

    def __init__(self, state_dir: Path, engine: ViewEngine, wait_seconds: float, history: EventHistory):
        self._path = state_dir / "view.jsonl"
        self._history = history
        self._header = _Header(state_dir / "view.state")
        self._lock_fd = os.open(state_dir / "view.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._engine = engine
        self._wait_ns = int(wait_seconds * 1e9)
        self._volunteer = False
        self._watcher: _Watcher | None = None
        self._takeover = threading.Lock()
        self._loaded: Snapshot | None = None
        self._load_lock = threading.Lock()
        # Container id -> the token of this worker's change to it under the allocation lock, until its wait sees it.
        self._acks: dict[str, int] = {}
        self._acks_lock = threading.Lock()

    def volunteer(self) -> None:
        """Watch whenever no one else does: now, or at the first read after the watcher went away."""
        self._volunteer = True
        self._someone_watches()

    def _someone_watches(self) -> bool:
        """True while a watcher holds the lock; a volunteer takes it over when it is free."""
        if self._watcher is not None:
            return True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        if not self._volunteer:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            return False
        with self._takeover:
            if self._watcher is None:
                self._watcher = _Watcher(self._path, self._header, self._engine, self._wait_ns, self._published, self._history)
        return True

    def snapshot(self) -> Snapshot | None:
        """The view when it can be trusted, waiting out a sync in progress; None: read the engine."""
        return self._trusted(wait=True)

    def snapshot_for_allocation(self) -> Snapshot | None:
        """The view for a decision under the allocation lock: trusted now (no waiting out a sync
        under the lock), and shown to hold every change made under the lock (see
        `changed_under_lock`); None: list the engine."""
        header = self._header
        if header.get(header.ALLOCATION_ASKED) != header.get(header.ALLOCATION_DONE):
            return None
        return self._trusted(wait=False)

    def changed_under_lock(self, container_id: str | None) -> None:
        """A change just made under the allocation lock gave a container what a view a moment behind
        would call free (its create, its start after a stop): allocation decisions list the engine
        until this worker's wait for the view sees the container (`await_started`) or the watcher
        lists the engine. Said once the change is made, before the lock goes: a list the watcher
        began before the change would miss it. `container_id` None: no wait will see it; only a
        list does. Reads are not held up."""
        token = int.from_bytes(os.urandom(8), "little")
        self._header.set(self._header.ALLOCATION_ASKED, token)
        if container_id is not None:
            with self._acks_lock:
                if len(self._acks) >= MAX_ACKS:
                    self._acks = {}
                self._acks[container_id] = token

    def _acknowledge(self, container_id: str, shown: bool) -> None:
        """`shown`: the view shows `container_id` started after this worker's change to it, so it
        holds every change made under the lock up to that one (the engine's events come in order):
        unless a later change was made since, allocation may decide on the view again. A wait that
        did not see it leaves the change to the watcher's next list (a sync, a resync asked for, or
        the minute's); the token is dropped either way, so no later wait for the container answers for it."""
        with self._acks_lock:
            token = self._acks.pop(container_id, None)
        header = self._header
        if shown and token is not None and header.get(header.ALLOCATION_ASKED) == token:
            header.set(header.ALLOCATION_DONE, token)

    def _trusted(self, wait: bool) -> Snapshot | None:
        give_up = None
        while self._someone_watches():
            header = self._header
            state, deadline = header.get(header.STATE), header.get(header.DEADLINE)
            settled = header.get(header.RESYNC_ASKED) == header.get(header.RESYNC_DONE)
            now = time.monotonic_ns()
            if deadline - now > max(self._wait_ns, TRUST_NS):  # set before this boot (the clock starts at boot): a view from before a reboot
                return None
            if state == LIVE and now < deadline and settled:
                return self._load()
            if state == DOWN or now >= deadline or not wait:
                return None
            give_up = give_up or now + self._wait_ns
            if now >= give_up:
                return None
            time.sleep(SYNC_POLL_SECONDS)
        return None

    def engine_answered_within(self, seconds: float) -> bool:
        """True when the node's watcher heard from the engine in the last `seconds` (it vouches for
        TRUST_SECONDS after each answer or event): any worker may take that as the engine answering."""
        header = self._header
        if header.get(header.STATE) != LIVE:
            return False
        answered_at, now = header.get(header.DEADLINE) - TRUST_NS, time.monotonic_ns()
        return 0 <= now - answered_at <= seconds * 1e9

    def _load(self) -> Snapshot | None:
        """The published view, read from the file only when its generation moved."""
        generation = self._header.get(self._header.GENERATION)
        loaded = self._loaded
        if loaded is not None and loaded.generation == generation:
            return loaded
        with self._load_lock:
            loaded = self._loaded
            if loaded is None or loaded.generation != generation:
                try:
                    loaded = self._loaded = Snapshot.read(self._path, previous=loaded)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("the node view file cannot be read (%s); reading the engine", type(exc).__name__)
                    return None
        return loaded

    def _published(self, snapshot: Snapshot) -> None:
        """The watcher's own worker takes what it wrote without reading the file back."""
        self._loaded = snapshot

    # --- read-your-writes --------------------------------------------------------------

    def await_started(self, container_id: str, before: ContainerState | None = None) -> None:
        """Return once the view shows the container started (or is not trusted, so reads go to the engine): a 201 is answered
        only when every worker's list shows it. `before`: its record before this start, when it ran before: a record
        that counts started later than it, under its claim's own name (a record of an older run, or of
        a stop since, does not)."""
        def started(c: ContainerState | None) -> bool:
            if c is None or c.status == "created":
                return False
            return before is None or (c.started > before.started and StopMark.parse(c.name, c.labels.get(CLAIM_LABEL, "")) is None)

        self._acknowledge(container_id, self._await(container_id, started, "start"))

    def await_stopped(self, container_id: str) -> None:  # once the view shows it no longer running (see await_started)
        self._await(container_id, lambda c: c is None or c.status not in ("running", "restarting", "paused"), "stop")

    def await_removed(self, container_id: str) -> None:
        """Return once the view no longer shows the container (see `await_started`)."""
        self._await(container_id, lambda c: c is None, "removal")

    def _await(self, container_id: str, shown: Callable[[ContainerState | None], bool], change: str) -> bool:
        """True once the view shows the change; False when it is not trusted, or did not show it in time."""
        give_up = time.monotonic_ns() + self._wait_ns
        while (snapshot := self.snapshot()) is not None:
            if shown(snapshot.get(container_id)):
                return True
            if time.monotonic_ns() >= give_up:
                log.warning("the node view did not show the %s of container %s in time; asking for a full resync", change, container_id[:12])
                self.request_resync()
                return False
            time.sleep(CHANGE_POLL_SECONDS)
        return False

    def request_resync(self) -> None:
        """Distrust the view until the watcher has checked it against a fresh list call."""
        self._header.set(self._header.RESYNC_ASKED, int.from_bytes(os.urandom(8), "little"))

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        if self._watcher is not None and not self._watcher.close():
            log.warning("the node view's watcher did not stop in time; the lock stays with this worker until it exits")
            self._lock_fd = -1  # a watcher still running could write an old view over its successor's
            return
        os.close(self._lock_fd)  # releases the lock: another worker takes over at its next read
        self._lock_fd = -1
        self._header.close()


class _Watcher:
    """Keeps the view: one list when it (re)connects, then one inspect per changed container."""

    def __init__(self, path: Path, header: _Header, engine: ViewEngine, wait_ns: int, on_publish: Callable[[Snapshot], None],
                 history: EventHistory):
        self._path = path
        self._history = history
        # The changes of records made since the last publish, as the history's lines.
        self._changes: list[dict[str, Any]] = []
        # Containers the engine said were OOM-killed whose die has not come yet.
        self._oom_seen: set[str] = set()
        self._header = header
        self._engine = engine
        self._wait_ns = wait_ns
        self._on_publish = on_publish
        self._closed = threading.Event()
        self._feed: EventFeed | None = None
        self._live = False
        # When the engine last answered, as vouched for (monotonic ns).
        self._answered_ns = 0
        self._records: dict[str, ContainerState] = {}
        # The last snapshot written: the lines of records that did not change are not encoded again.
        self._last_written: Snapshot | None = None
        self._event_ns = 0
        self._generation = header.get(header.GENERATION)
        try:
            previous = Snapshot.read(path)
            self._records = {c.id: c for c in previous.containers}
            self._event_ns = previous.event_ns
            self._generation = max(self._generation, previous.generation)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self._syncing()
        log.info("watching the engine's events for the node view (pid %d, %d containers known)", os.getpid(), len(self._records))
        self._thread = threading.Thread(target=self._run, name="node-view", daemon=True)
        self._thread.start()

    def close(self) -> bool:
        """Stop watching; False when the thread did not end in time."""
        self._closed.set()
        if self._feed is not None:
            self._feed.close()
        self._thread.join(timeout=2 * HEARTBEAT_SECONDS)
        self._header.set(self._header.STATE, DOWN)
        return not self._thread.is_alive()

    # --- the header --------------------------------------------------------------------

    def _syncing(self) -> None:
        """Readers wait for the sync while it progresses (each engine answer moves the deadline)."""
        if self._closed.is_set():
            return
        self._header.set(self._header.STATE, SYNCING)  # first: a reader never sees LIVE with a syncing deadline
        self._header.set(self._header.DEADLINE, time.monotonic_ns() + self._wait_ns)

    def _vouch(self, answered_since: int) -> None:
        """The engine answered (or sent events) after `answered_since`: trust the view a while from then
        (from the latest answer: a batch vouched for as a whole does not undo its inspects' answers)."""
        if self._closed.is_set():
            return
        self._answered_ns = max(self._answered_ns, answered_since)
        self._header.set(self._header.DEADLINE, self._answered_ns + TRUST_NS)
        self._header.set(self._header.STATE, LIVE)

    def _down(self, reason: str) -> None:
        self._header.set(self._header.STATE, DOWN)
        if self._live and not self._closed.is_set():
            log.warning("node view not trusted: %s; workers read the engine until its events are back", reason)
        self._live = False

    # --- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._connect()
                self._follow()
            except Exception as exc:  # the engine went away or failed; try again below
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self._down(reason)
            finally:
                if self._feed is not None:
                    self._feed.close()
            self._closed.wait(RECONNECT_SECONDS)

    def _connect(self) -> None:
        """Open the event stream from the last event seen, then bring the records up to one list call."""
        previous = self._feed
        while previous is not None and previous.thread.is_alive():
            if self._closed.wait(HEARTBEAT_SECONDS):
                return
        self._syncing()
        self._feed = EventFeed(self._engine, self._event_ns + 1 if self._event_ns else None, VIEW_EVENTS)
        self._feed.wait_opened(self._wait_ns / 1e9)
        started = time.monotonic_ns()
        asked, allocation_asked = self._header.get(self._header.RESYNC_ASKED), self._header.get(self._header.ALLOCATION_ASKED)
        changed = self._reconcile(self._engine.managed_rows(), syncing=True)
        self._publish()
        self._header.set(self._header.RESYNC_DONE, asked)
        self._header.set(self._header.ALLOCATION_DONE, allocation_asked)
        self._vouch(started)
        if not self._live:
            log.info("node view live: %d managed containers, %d changed since it was last written", len(self._records), changed)
        self._live = True

    def _follow(self) -> None:
        """Apply events as they come; while none come, prove that the engine still answers."""
        next_resync = time.monotonic() + RESYNC_SECONDS
        while not self._closed.is_set():
            batch = self._feed.next_batch(HEARTBEAT_SECONDS)
            if batch is None:
                raise StreamEnded(self._feed.reason())
            started = time.monotonic_ns()
            asked, allocation_asked = self._header.get(self._header.RESYNC_ASKED), self._header.get(self._header.ALLOCATION_ASKED)
            if batch:
                self._apply(batch)
            elif asked != self._header.get(self._header.RESYNC_DONE) or time.monotonic() >= next_resync:
                if self._reconcile(self._engine.managed_rows()):
                    self._publish()
                self._header.set(self._header.RESYNC_DONE, asked)
                self._header.set(self._header.ALLOCATION_DONE, allocation_asked)  # the list shows every change asked before it
                next_resync = time.monotonic() + RESYNC_SECONDS
            else:
                if self._last_written is not None and self._history.revision() != self._last_written.revision:
                    self._publish()  # GPUs or the drain changed: the view's revision follows, so a list's stays recent
                self._engine.ping()
            self._vouch(started)

    # --- the records -------------------------------------------------------------------

    def _apply(self, events: list[dict[str, Any]]) -> None:
        """Each container named in the batch is inspected once (a destroyed one is just dropped).

        The view's last event moves only once the whole batch is applied: if an inspect fails,
        the reconnection replays the batch. A batch that changed no record is saved under the same
        generation, so no worker reads the file again for it."""
        by_container: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            container_id = event.get("id") or (event.get("Actor") or {}).get("ID")
            if container_id:
                by_container.setdefault(container_id, []).append(event)
        told = self._tell_exits(by_container)
        changed = [self._refresh(cid, their[-1].get("Action") == "destroy", their, cid in told) for cid, their in by_container.items()]
        self._event_ns = max(self._event_ns, *(int(event.get("timeNano") or 0) for event in events))
        self._publish(bump=any(changed))

    def _tell_exits(self, by_container: dict[str, list[dict[str, Any]]]) -> set[str]:
        """Put the exits the batch announces in the history before inspecting (see events.changes.exit_line);
        the ids of the containers whose exit is told."""
        lines = {}
        for cid, their in by_container.items():
            actions = {event.get("Action") for event in their}
            if cid in self._records and (line := exit_line(self._records[cid], their, cid in self._oom_seen)):
                lines[cid] = line
            if "die" in actions or "destroy" in actions:
                self._oom_seen.discard(cid)
            elif "oom" in actions:
                self._oom_seen.add(cid)  # its die may come in the next batch
        if lines:
            self._history.record(list(lines.values()))
        return set(lines)

    def _reconcile(self, rows: list[dict[str, Any]], syncing: bool = False) -> int:
        """Make the records agree with one list call: drop what is gone, inspect only what is new or
        changed. Returns how many records changed."""
        listed = {row["Id"]: row for row in rows}
        gone = set(self._records) - set(listed)
        for container_id in gone:
            self._changes += container_changes(self._records.pop(container_id), None, [])
        stale = [cid for cid, row in listed.items() if cid not in self._records or not self._records[cid].agrees_with(row)]
        changed = len(gone)
        for container_id in stale:
            changed += self._refresh(container_id)
            if syncing:
                self._syncing()
        return changed

    def _refresh(self, container_id: str, gone: bool = False, engine_events: list[dict[str, Any]] | None = None, exit_told: bool = False) -> bool:
        """Inspect one container into the records, noting the change for the history; True when its record changed.

        A live view is vouched for by each answer: a batch of events for containers the engine is
        starting (an inspect waits for the start) may take longer than the trust, and the engine
        is answering all along."""
        info = None
        if not gone:
            asked = time.monotonic_ns()
            info = self._engine.inspect(container_id)
            if self._live:
                self._vouch(asked)
        before = self._records.get(container_id)
        if info is None:
            if before is None:
                return False
            del self._records[container_id]
            self._changes += container_changes(before, None, engine_events or [], exit_told)
            return True
        state = ContainerState.from_inspect(info)
        if before == state:
            return False
        self._records[container_id] = state
        self._changes += container_changes(before, state, engine_events or [], exit_told)
        return True

    def _publish(self, bump: bool = True) -> None:
        """Write the view, then bump the generation: a reader that sees the new number finds the new file.

        Without `bump` only the last event time moved: the records are the published ones."""
        if self._closed.is_set():  # the lock may be another worker's already
            return
        self._generation += bump
        containers = tuple(sorted(self._records.values(), key=lambda c: (-c.created, c.id)))
        # The changes go to the history before the view shows them, under its lock: a worker killed
        # in between repeats them at the next sync rather than lose them, and the view's revision
        # is exact (every container change up to it is in the view, none after it).
        with self._history.locked():
            revision = self._history.append_locked(self._changes)
            self._changes = []
            snapshot = self._last_written = Snapshot.of(self._generation, self._event_ns, containers, self._last_written, revision)
            snapshot.write(self._path)
        if bump:
            self._header.set(self._header.GENERATION, self._generation)
            self._on_publish(snapshot)
