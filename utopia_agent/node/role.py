"""A job that one worker of the node does for all of them (watch GPU events, sample NVML).

The role belongs to whichever process holds an flock on its file in the state dir. The kernel
drops the lock with the process's file descriptors, so when the holder dies, the next worker
that asks takes the role over; nothing is left to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class NodeRole:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self, block: bool = False) -> bool:
        """Hold the role from now on for the life of this process; False while another holds it.

        With `block`, wait (asleep in the kernel, without the GIL) until the holder lets it go."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
