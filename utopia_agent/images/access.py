"""Private images: which images the agent pulled with credentials, kept in the state dir.

An image pulled with a create's credentials stays private on this node (KEP-2535's rule): a
later create naming it, by any reference or its id, must hold credentials its registry accepts,
even though the layers are cached. The record names the reference, the image's id and who
pulled it (a digest of the registry and the user); never a password.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..node.state_file import StateFile


class PrivateImages:
    """The state dir's record of private images: reference -> {"id", "owners", "pulled_at"}.

    A reference is recorded before its pull starts (its id still unknown), so there is no moment
    at which the pulled image is on the node but not yet private. Writers hold the allocation
    lock; readers read the small file afresh (see node/state_file.py).
    """

    def __init__(self, state_dir: Path, lock: Callable[[], AbstractContextManager]):
        self._file = StateFile(state_dir / "private-images.json")
        self._lock = lock

    def references(self, image: str, image_id: str) -> list[str]:
        """The private references the image named `image`, of id `image_id`, was pulled as; [] when public."""
        return sorted(ref for ref, record in self._file.read().items() if ref == image or record.get("id") == image_id)

    def records(self) -> dict[str, dict[str, Any]]:
        return self._file.read()

    def pulling(self, image: str) -> None:
        """Mark `image` private before a pull with credentials starts; `pending` counts those under way."""
        self._update(image, lambda record: {**record, "pending": record.get("pending", 0) + 1})

    def pulled(self, image: str, image_id: str, owner: str) -> None:
        self._update(image, lambda record: {**record, "id": image_id, "owners": sorted({*record.get("owners", ()), owner}),
                                            "pulled_at": int(time.time()), "pending": max(record.get("pending", 1) - 1, 0)})

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

    def made_public(self, image: str, image_id: str) -> None:
        """An image the registry gave without credentials is public: forget it was private."""
        with self._lock():
            records = self._file.read()
            kept = {ref: record for ref, record in records.items() if ref != image and record.get("id") != image_id}
            if kept != records:
                self._file.write(kept)

    def _update(self, image: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        with self._lock():
            records = self._file.read()
            records[image] = change(records.get(image, {"id": None}))
            self._file.write(records)
