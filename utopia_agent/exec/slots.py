"""The bound on exec sessions, per claim and for the whole agent, across workers.

Each session holds an flock on one of MAX_EXEC_SESSIONS slot files, so a killed worker frees
its slots at once; the file holds the claim of its session, so a claim's sessions are counted
by reading the held slots. Taking one is serialised by a lock file of its own, so two workers
never both take a claim's last place.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..config import MAX_EXEC_SESSIONS
from ..errors import TooManyExecSessions


class SessionSlots:
    """At most MAX_EXEC_SESSIONS sessions in the agent, and `per_claim` for any one claim."""

    def __init__(self, folder: Path, per_claim: int):
        folder.mkdir(parents=True, exist_ok=True)
        self._taking = folder / "taking.lock"
        self._paths = [folder / f"session-{i}" for i in range(MAX_EXEC_SESSIONS)]
        self.per_claim = per_claim

    def take(self, claim_id: str) -> int:
        """The fd of a slot now held for the claim: close it when the session ends."""
        taking = os.open(self._taking, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(taking, fcntl.LOCK_EX)
            free, claims = None, 0
            for path in self._paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    claims += os.pread(fd, 256, 0).decode(errors="replace") == claim_id
                    os.close(fd)
                    continue
                if free is None:
                    free = fd
                else:
                    os.close(fd)
            if free is not None and claims >= self.per_claim:
                os.close(free)
                raise TooManyExecSessions(f"claim {claim_id} already runs {claims} exec sessions, this node's "
                                          "UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM; retry after Retry-After seconds")
            if free is None:
                raise TooManyExecSessions(f"the agent already runs {MAX_EXEC_SESSIONS} exec sessions; retry after Retry-After seconds")
            os.ftruncate(free, 0)
            os.pwrite(free, claim_id.encode(), 0)
            return free
        finally:
            os.close(taking)  # and with it the lock
