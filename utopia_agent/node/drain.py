"""Whether the node takes new claims: the operator's drain, in STATE_DIR/drain.json.

While the node drains, creates get 409 `node_draining` with the operator's reason; everything
else (lists, deletes, metrics, /health) works as usual. The record is shared by every worker
and kept across restarts, and it is written under the allocation lock, so no create that
decides after a drain is recorded gets through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..errors import NodeDraining
from ..events.changes import node_change
from ..events.history import EventHistory
from .state_file import StateFile

log = logging.getLogger("utopia_agent.node")


class NodeDrain:
    def __init__(self, state_dir: Path, lock: Callable[[], AbstractContextManager], history: EventHistory):
        self._file = StateFile(state_dir / "drain.json")
        self._lock = lock
        self._history = history

    def state(self) -> dict[str, Any]:
        """`{"draining": bool, "reason": str|null, "since": unix seconds|null}`."""
        record = self._file.read()
        if "reason" not in record:
            return {"draining": False, "reason": None, "since": None}
        return {"draining": True, "reason": record["reason"], "since": record.get("since")}

    def refuse_if_draining(self) -> None:
        state = self.state()
        if state["draining"]:
            raise NodeDraining(f"the node is draining: {state['reason']}", reason=state["reason"])

    def drain(self, reason: str) -> dict[str, Any]:
        """Start draining (or change the reason of a drain already on; it keeps its start)."""
        with self._lock():
            since = self._file.read().get("since") or int(time.time())
            record = {"reason": reason, "since": since}
            self._file.write_announced(record, lambda: self._history.record([node_change("drain", self.state())]))
        log.warning("node draining reason=%s", reason)
        return self.state()

    def resume(self) -> dict[str, Any]:
        with self._lock():
            draining = self.state()["draining"]
            if draining:
                self._file.write_announced(None, lambda: self._history.record([node_change("resume", self.state())]))
        if draining:
            log.warning("node resumed taking claims")
        return self.state()
