"""The node's changes as one numbered history in the state dir, which every worker serves as a stream.

Each change is one JSON line that starts with its `revision`. A revision is assigned by whoever
records the change (the node view's watcher for containers, the holder of the allocation lock
for GPUs and the drain), under an flock on STATE_DIR/events/lock: it is the last line's plus
one, so revisions only grow, whichever process writes and across restarts of the agent.

The lines go to STATE_DIR/events/current.jsonl; once it holds `keep` lines it becomes
previous.jsonl (replacing the one before) and a new current file starts, so between `keep`
and 2 * `keep` lines are on disk. What is served is exact whatever is on disk: a resume from
further back than `keep` changes is refused (410), never answered with a gap.

Readers need no lock: lines are appended with one write, under the lock, and a line counts
once the revision word says so (it moves after the write and before a rotation). A write that
fails for lack of space is taken back (the file truncated to where it ended), so a full disk
never leaves half a line, and a reader never serves a line before it counts. A reader that
finds the revisions it reads not following one another (it slept through two rotations) stops
rather than skip.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, RevisionTooOld

CURRENT, PREVIOUS, LOCK, REVISION = "current.jsonl", "previous.jsonl", "lock", "revision"
_REVISION_AT = len(b'{"revision": ')
# The tail read to find the last line: lines are a container's record at most, a few KB.
_TAIL_BYTES = 64 * 1024


class HistoryGap(Exception):
    """A reader fell more than a rotation behind: it must stop, and its client resume (410 or exact)."""


def revision_of(line: bytes) -> int:
    return int(line[_REVISION_AT:line.index(b",", _REVISION_AT)])


class EventHistory:
    def __init__(self, state_dir: Path, keep: int):
        self.folder = state_dir / "events"
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self.keep = keep
        # The last revision, in a mapped word every process reads (each list answer reads it): the
        # files are the truth, the word is set from them under the lock after each append.
        fd = os.open(self.folder / REVISION, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Real blocks, not a hole: a store through the map into a hole of a full filesystem is SIGBUS.
            os.posix_fallocate(fd, 0, 8)
            self._word = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        with self.locked():
            self._publish(self._last_written())

    @contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def revision(self) -> int:
        """The last change's revision (0 before the first)."""
        return struct.unpack_from("<q", self._word)[0]

    def _publish(self, revision: int) -> None:
        """Commit `revision` with a write, not a store through the map: streams wake on writes to the folder
        (inotify), and one that read the appended lines before this found them uncommitted and went back to
        sleep (its next look came up to a second later: the bench's p99 from the engine's die to the exited line)."""
        if self.revision() == revision:
            return
        fd = os.open(self.folder / REVISION, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, struct.pack("<q", revision), 0)
        finally:
            os.close(fd)

    def _last_written(self) -> int:
        """The last revision on disk: the current file's last line, else the previous file's."""
        for name in (CURRENT, PREVIOUS):
            try:
                with open(self.folder / name, "rb") as file:
                    size = file.seek(0, os.SEEK_END)
                    file.seek(max(0, size - _TAIL_BYTES))
                    tail = file.read()
            except FileNotFoundError:
                continue
            lines = [line for line in tail.split(b"\n") if line.startswith(b'{"revision": ')]
            if lines:
                return revision_of(lines[-1])
        return 0

    def record(self, changes: list[dict[str, Any]]) -> int:
        """Append the changes (dicts without a revision) in order, numbered; returns the last revision."""
        with self.locked():
            return self.append_locked(changes)

    def append_locked(self, changes: list[dict[str, Any]]) -> int:
        """As `record`, for a caller that holds `locked()`; the last revision, moved or not."""
        revision = self._last_written()
        if not changes:
            self._publish(revision)
            return revision
        now = time.time()
        lines = []
        for change in changes:
            revision += 1
            lines.append(json.dumps({"revision": revision, "time": round(now, 6), **change}, separators=(", ", ": ")).encode() + b"\n")
        path = self.folder / CURRENT
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            end = os.fstat(fd).st_size
            data = b"".join(lines)
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError:
                os.ftruncate(fd, end)  # take back what landed (shrinking needs no space): the file stays whole
                raise
        finally:
            os.close(fd)
        self._publish(revision)
        if revision - _first_revision(path) + 1 >= self.keep:
            os.replace(path, self.folder / PREVIOUS)
        return revision

    def reader(self, since: int | None) -> HistoryReader:
        """A reader of the changes after `since` (None: after the last one now).

        InvalidRequest when `since` is ahead of the history; RevisionTooOld when the history no
        longer holds every change after it."""
        last = self.revision()
        if since is None:
            since = last
        elif since > last:
            raise InvalidRequest(f"since={since} is ahead of the node's last revision {last}", errors={"since": [f"at most {last}"]})
        elif since < last - self.keep:
            raise RevisionTooOld(
                f"the history keeps the last {self.keep} changes, from revision {last - self.keep + 1}; list again and watch from the list's revision",
                revision=last,
            )
        return HistoryReader(self.folder, since, self.revision)


def _first_revision(path: Path) -> int:
    with open(path, "rb") as file:
        return revision_of(file.readline())


class HistoryReader:
    """Reads the lines after a revision, then each new one as it comes; never skips one."""

    def __init__(self, folder: Path, after: int, committed: Callable[[], int]):
        """`committed`: the last revision that counts; a line after it is left for a later read."""
        self.folder = folder
        self.after = after
        self._committed = committed
        self._file = None
        self._open_at(after)

    def _open_at(self, after: int) -> None:
        """Position on the first line after `after`: in the previous file when it starts there."""
        for name in (PREVIOUS, CURRENT):
            try:
                file = open(self.folder / name, "rb")
            except FileNotFoundError:
                continue
            data = file.read()
            lines = data.split(b"\n")
            if lines[0] and revision_of(lines[0]) > after + 1:
                file.close()  # starts later than asked: the next file cannot do better
                raise HistoryGap(f"revision {after + 1} is no longer kept")
            at = data.find(b'\n{"revision": %d,' % (after + 1))
            if data.startswith(b'{"revision": %d,' % (after + 1)):
                at = 0
            elif at >= 0:
                at += 1
            if at < 0 and name == PREVIOUS:
                file.close()
                continue
            file.seek(at if at >= 0 else len(data))
            self._file = file
            return

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self) -> list[bytes]:
        """The whole lines written since the last read, in order (each ends with a newline)."""
        lines = self._read_file()
        if self._rotated():
            lines += self._read_file()  # the file was complete before it was renamed
            self._switch()
            lines += self._read_file()
        return lines

    def _read_file(self) -> list[bytes]:
        if self._file is None:
            self._switch()
            if self._file is None:
                return []
        start = self._file.tell()
        data = self._file.read()
        committed = self._committed()
        lines, taken = [], 0
        # Whole lines that count only; the file is read again from the first one left, so a line
        # being written, or being taken back, is read once it is whole and counts.
        for line in data.split(b"\n")[:-1]:
            revision = revision_of(line)
            if revision > committed:
                break
            taken += len(line) + 1
            if revision <= self.after:
                continue
            if revision != self.after + 1:
                raise HistoryGap(f"expected revision {self.after + 1}, found {revision}")
            self.after = revision
            lines.append(line + b"\n")
        self._file.seek(start + taken)
        return lines

    def _rotated(self) -> bool:
        """True when the current file is no longer the one being read (it was renamed to previous)."""
        if self._file is None:
            return False
        try:
            named = os.stat(self.folder / CURRENT)
        except FileNotFoundError:
            return True
        held = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino)

    def _switch(self) -> None:
        self.close()
        try:
            self._file = open(self.folder / CURRENT, "rb")
        except FileNotFoundError:
            self._file = None
