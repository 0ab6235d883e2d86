"""The images the agent pulled, kept in the state dir: what makes one private, and what image
collection may remove.

An image pulled with a create's credentials stays private on this node (KEP-2535's rule): a
later create naming it, by any reference or its id, must hold credentials its registry accepts,
even though the layers are cached. An image the agent pulled without credentials is public; one
it never pulled (the operator's) is preloaded, never collected. A record names the reference,
the image's id, who pulled it (a digest of the registry and the user, never a password), when,
and when a container last used it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..node.state_file import StateFile

# A create renews its image's last use when the record's is older than this (seconds).
LAST_USED_RESOLUTION = 60


class PulledImages:
    """reference -> {"id", "private", "owners", "pending", "pulled_at", "last_used"}.

    A reference pulled with credentials is marked before its pull starts (its id still unknown),
    so there is no moment at which the pulled image is on the node but not yet private. Writers
    hold the allocation lock; readers read the small file afresh (see node/state_file.py).
    """

    def __init__(self, state_dir: Path, lock: Callable[[], AbstractContextManager]):
        self._file = StateFile(state_dir / "pulled-images.json")
        self._lock = lock

    def read(self) -> dict[str, dict[str, Any]]:
        return self._file.read()

    def check_out(self, image: str, image_id: str) -> list[str]:
        """For a create of the present image `image` (id `image_id`): the private references it was
        pulled as ([] when it is not private). Its last use is renewed when older than
        LAST_USED_RESOLUTION, so collection never takes an image a create is about to use, at
        the cost of one write per image a minute at most."""
        records = self._file.read()
        mine = {ref: record for ref, record in records.items() if ref == image or record.get("id") == image_id}
        if any(record.get("last_used", 0) < time.time() - LAST_USED_RESOLUTION for record in mine.values()):
            self.used([image_id], time.time())
        return sorted(ref for ref, record in mine.items() if record.get("private"))

    def pulling(self, image: str) -> None:
        """Mark `image` private before a pull with credentials starts; `pending` counts those under way."""
        self._update(image, lambda record: {**record, "private": True, "pending": record.get("pending", 0) + 1})

    def pulled(self, image: str, image_id: str, owner: str | None) -> None:
        """Record a pull that brought `image`: with an `owner` (it had credentials) it is private;
        without, the registry gives it to anyone, and every reference of that id is public."""
        now = int(time.time())
        with self._lock():
            records = self._file.read()
            if owner is None:
                for record in records.values():
                    if record.get("id") == image_id:
                        record.update(private=False, owners=[])
            record = records.get(image, {})
            owners = sorted({*record.get("owners", ()), owner}) if owner else []
            pending = max(record.get("pending", 1) - 1, 0) if owner else record.get("pending", 0)
            records[image] = {**record, "id": image_id, "private": bool(owners), "owners": owners, "pending": pending,
                              "pulled_at": now, "last_used": now}
            self._file.write(records)

    def failed(self, image: str) -> None:
        """A pull with credentials brought nothing: once no other is under way, a mark that never
        got an image goes (a wrong password leaves nothing behind)."""
        with self._lock():
            records = self._file.read()
            record = records.get(image)
            if record is None:
                return
            record["pending"] = max(record.get("pending", 1) - 1, 0)
            if record["pending"] == 0 and record.get("id") is None:
                del records[image]
            self._file.write(records)

    def used(self, image_ids: Iterable[str], at: float) -> None:
        """Note that containers use these images now (collection's least-recently-used order)."""
        ids = set(image_ids)
        if not any(record.get("id") in ids for record in self._file.read().values()):
            return  # nothing of the agent's is in use: no lock, no write
        with self._lock():
            records = self._file.read()
            touched = [record for record in records.values() if record.get("id") in ids]
            for record in touched:
                record["last_used"] = int(at)
            if touched:
                self._file.write(records, durable=False)

    def forget(self, image_id: str) -> None:
        """The image left the node: drop every reference of it."""
        with self._lock():
            records = self._file.read()
            kept = {ref: record for ref, record in records.items() if record.get("id") != image_id}
            if kept != records:
                self._file.write(kept)

    def _update(self, image: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        with self._lock():
            records = self._file.read()
            records[image] = change(records.get(image, {"id": None}))
            self._file.write(records)
