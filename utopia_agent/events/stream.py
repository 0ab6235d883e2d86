"""Serving the history as a stream: wake on each new line (inotify), heartbeats, and the bound on streams.

A stream holds one request thread while it is open. The streams of the whole agent are bounded
(MAX_STREAMS, one flock'ed slot file each, so a killed worker frees its slots at once), and each
worker has MAX_STREAMS threads beyond those that serve every other request (gunicorn.conf.py),
so open streams never make /health or any other route wait.

A stream sleeps until the history's folder changes: one thread per worker waits on inotify and
wakes the streams, so a new line is sent within a millisecond or so, and an idle stream costs
nothing between heartbeats.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from ..errors import TooManyStreams
from .history import EventHistory, HistoryGap, HistoryReader

log = logging.getLogger("utopia_agent.events")

MAX_STREAMS = 16
IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_CLOEXEC = 0x2, 0x80, 0x100, 0o2000000
# Without inotify (not Linux) streams look for new lines this often.
POLL_SECONDS = 0.05


class ChangeNotifier:
    """Wakes every waiting stream of this process when a file of the history's folder changes."""

    def __init__(self, folder: Path):
        self._changed = threading.Condition()
        self._count = 0
        fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, str(folder).encode(), IN_MODIFY | IN_MOVED_TO | IN_CREATE) < 0:
                os.close(fd)
                fd = -1
        except (OSError, AttributeError):
            fd = -1
        if fd < 0:
            log.warning("inotify unavailable: event streams look for new changes every %g s", POLL_SECONDS)
            self._poll = POLL_SECONDS
            return
        self._poll = None
        threading.Thread(target=self._watch, args=(fd,), name="events-notifier", daemon=True).start()

    def _watch(self, fd: int) -> None:
        while True:
            os.read(fd, 4096)
            with self._changed:
                self._count += 1
                self._changed.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait(self, seen: int, timeout: float) -> None:
        """Return once something changed after the count `seen` was read, or after `timeout`."""
        with self._changed:
            if self._count == seen:
                self._changed.wait(timeout if self._poll is None else min(timeout, self._poll))


class StreamSlots:
    """At most MAX_STREAMS streams in the whole agent: each holds an flock on one slot file."""

    def __init__(self, folder: Path):
        self._paths = [folder / f"stream-{i}" for i in range(MAX_STREAMS)]

    def take(self) -> int:
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        raise TooManyStreams(f"the agent already serves {MAX_STREAMS} event streams; retry after Retry-After seconds")


def heartbeat(revision: int) -> bytes:
    return json.dumps({"revision": revision, "time": round(time.time(), 6), "kind": "heartbeat"}).encode() + b"\n"


def stream_lines(reader: HistoryReader, notifier: ChangeNotifier, heartbeat_seconds: float, stopping: threading.Event,
                 first_heartbeat: bool, client_gone: Callable[[], bool] = lambda: False, timeout: float | None = None) -> Iterator[bytes]:
    """The lines after the reader's revision, then each new one; a heartbeat when nothing came for a while.

    Ends when the worker stops, when the client has gone (looked at each second, so its slot
    is free again without waiting for a heartbeat to fail), when the reader fell behind the
    history (the client resumes and is told 410 or gets the rest exactly), or `timeout` seconds
    after it began: then with a last heartbeat, whose revision the client resumes from."""
    yield b""  # the answer's head goes out now, not with the first change
    if first_heartbeat:
        yield heartbeat(reader.after)
    next_heartbeat = time.monotonic() + heartbeat_seconds
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not stopping.is_set() and not client_gone():
            seen = notifier.count
            try:
                lines = reader.read()
            except HistoryGap as gap:
                log.warning("event stream ended: %s", gap)
                return
            if lines:
                yield b"".join(lines)
                next_heartbeat = time.monotonic() + heartbeat_seconds
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                yield heartbeat(reader.after)
                return
            if now >= next_heartbeat:
                yield heartbeat(reader.after)
                next_heartbeat = now + heartbeat_seconds
            wake = min(next_heartbeat, deadline) if deadline is not None else next_heartbeat
            notifier.wait(seen, min(wake - now, 1.0) if wake > now else 0)
    finally:
        reader.close()


def hung_up(client: socket.socket) -> bool:
    """True once the client closed its side: nothing more comes on a stream's connection but its end."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError, ValueError):  # ValueError: a TLS socket cannot peek; its heartbeat tells
        return False
    except OSError:
        return True


class EventStreams:
    """One per worker: the history, its notifier (made at the first stream) and the slots."""

    def __init__(self, history: EventHistory, heartbeat_seconds: float):
        self.history = history
        self.heartbeat_seconds = heartbeat_seconds
        self.stopping = threading.Event()
        self._slots = StreamSlots(history.folder)
        self._notifier: ChangeNotifier | None = None
        self._lock = threading.Lock()

    def open(self, since: int | None, client: socket.socket | None = None, timeout: float | None = None) -> tuple[Iterator[bytes], int]:
        """A stream of the changes after `since` to `client`, ending after `timeout` seconds if given, and the
        slot fd it holds (close it when the stream ends)."""
        slot = self._slots.take()
        try:
            reader = self.history.reader(since)
        except BaseException:
            os.close(slot)
            raise
        with self._lock:
            if self._notifier is None:
                self._notifier = ChangeNotifier(self.history.folder)
        gone = partial(hung_up, client) if client is not None else (lambda: False)
        return stream_lines(reader, self._notifier, self.heartbeat_seconds, self.stopping, since is None, gone, timeout), slot

    def close(self) -> None:
        self.stopping.set()

