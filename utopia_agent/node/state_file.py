"""Small JSON records in the state dir that every worker shares and a restart keeps.

Writers hold the allocation lock (so a create that decides after a write sees it) and replace
the file atomically, so a reader never sees half a record and needs no lock. Readers read the
file afresh each time: it is a few hundred bytes, and a stat-keyed cache could miss a rewrite
that lands on a reused inode within the same timestamp tick.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

log = logging.getLogger("utopia_agent.state")


class StateFile:
    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, Any]:
        """The record, or {} when there is none. A record that does not parse is reported and read as
        {}: it can only come from a hand edit, since writes are atomic."""
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            log.error("state file %s does not parse (%s); reading it as empty", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, data: dict[str, Any], durable: bool = True) -> None:
        """Replace the record atomically, and durably (it survives a power cut) unless it is worth
        no more than a moment, as a sample taken each second is."""
        # One dumps and one write: json.dump encodes in pure Python and writes token by token, and
        # the GPU sample is rewritten every second (0.49 -> 0.31 ms of CPU a sample here).
        encoded = json.dumps(data, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            try:
                written = 0
                while written < len(encoded):
                    written += os.write(fd, encoded[written:])
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_announced(self, data: dict[str, Any] | None, announce: Callable[[], Any]) -> None:
        """Write `data` (None: remove the record), then `announce` it (put it in the event history):
        should the announcement fail (a full disk), the previous record is put back, so the change
        happens wholly or not at all. The previous record is kept by a second name meanwhile, which
        takes no space, so putting it back needs none either."""
        kept = self.path.with_name(f".{self.path.name}.previous")
        kept.unlink(missing_ok=True)
        try:
            os.link(self.path, kept)
        except FileNotFoundError:
            kept = None
        try:
            if data is None:
                self.remove()
            else:
                self.write(data)
            announce()
        except BaseException:
            if kept is not None:
                os.replace(kept, self.path)
            elif data is not None:
                self.remove()
            raise
        if kept is not None:
            kept.unlink(missing_ok=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class SampleFile:
    """The node-wide figures one worker samples every few seconds and every worker answers from
    ({"time": unix, "claims": {container id: {...}}}). Unlike the records above it is read on
    every stats call and scrape, so it is re-read only when its mtime changed: a rewrite missed
    within one timestamp tick costs no more than figures one sample old."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: tuple[float, dict] = (0.0, {})

    def read(self) -> dict:
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return {"time": 0.0, "claims": {}}
        if mtime != self._cache[0]:
            try:
                self._cache = (mtime, json.loads(self.path.read_text()))
            except (OSError, ValueError):
                return self._cache[1] or {"time": 0.0, "claims": {}}
        return self._cache[1]

    def write(self, samples: dict) -> None:
        """Replace the figures; this worker keeps what it wrote, so its next read does not parse the file back."""
        StateFile(self.path).write(samples, durable=False)
        self._cache = (os.stat(self.path).st_mtime, samples)
