"""A change counter shared by every worker of the node, so no worker serves a stale listing.

The counter is eight bytes in a file under the state dir, mapped into each worker. A worker
that changes a container writes a fresh random value; a worker whose cached listing was
read under another value lists again. A torn read can only look like a change, which costs
one extra engine call and never a wrong answer.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SIZE = 8


class SharedGeneration:
    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:SIZE]

    def bump(self) -> None:
        self._map[:SIZE] = os.urandom(SIZE)

    def close(self) -> None:
        self._map.close()
