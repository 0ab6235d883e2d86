"""A chore one worker of the node does per interval (the janitor's sweep, image collection).

Every worker runs the loop; a stamp in the state dir lets the first that finds it old do the
chore and renew it, so the node does it once per interval whatever the number of workers.
A round that fails is logged and the next one is tried at its time: the engine down is a warning
(the round is skipped), a failure of the node's own files an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from ..errors import AgentError
from .role import NodeRole
from .state_file import SampleFile

log = logging.getLogger("utopia_agent.chore")


class Background:
    """A worker's daemon thread: `_run` from start() on, until close() sets `_closed`."""

    def __init__(self, name: str):
        self._name = name
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        raise NotImplementedError


class NodeSampler(Background):
    """Figures sampled for the whole node: every worker runs one, the worker holding the node's role
    `<name>.lock` (see role.py) samples, every `tick` seconds, into `<name>.json` in the state dir,
    and every worker answers from that file. A round that fails is logged as `not_sampled` says:
    the engine down at debug, a failure of the node's own files as a warning."""

    def __init__(self, name: str, state_dir: Path, tick: float, logger: logging.Logger, not_sampled: str):
        super().__init__(name)
        self._samples = SampleFile(state_dir / f"{name}.json")
        self._role = NodeRole(state_dir / f"{name}.lock")
        self._tick = tick
        self._log = logger
        self._not_sampled = not_sampled

    def samples(self) -> dict:
        """The last node-wide figures: {"time": unix, "claims": {container id: {...}}}; re-read only when the file changed."""
        return self._samples.read()

    def _sample_round(self) -> object:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._closed.wait(self._tick):
            try:
                self._sample_round()
            except AgentError as error:
                self._log.debug(self._not_sampled, error.message)
            except OSError as error:
                self._log.warning(self._not_sampled, error)
        self._role.release()


class NodeChore(Background):
    def __init__(self, name: str, stamp: Path, interval: float, chore: Callable[[], None], at_start: bool = False):
        """`at_start`: look at once when the worker starts, rather than after half an interval."""
        super().__init__(name)
        self._stamp = stamp
        self._interval = interval
        self._chore = chore
        self._at_start = at_start

    def _run(self) -> None:
        if not self._at_start:
            self._closed.wait(self._interval / 2)
        while not self._closed.is_set():
            try:
                due = self._due()
            except OSError as error:  # the stamp cannot be renewed (a full state dir): look again next time
                log.warning("%s skipped: %s", self._name, error.strerror or error)
                due = False
            if due:
                self.run_now()
            self._closed.wait(self._interval / 2)

    def run_now(self) -> None:
        """One round of the chore in the caller's thread, its failures logged as the loop's are."""
        try:
            self._chore()
        except AgentError as error:
            log.warning("%s skipped: %s", self._name, error.message)
        except OSError as error:
            log.error("%s failed: %s", self._name, error)

    def _due(self) -> bool:
        """True for one worker per interval: the one that finds the stamp old and renews it."""
        try:
            if time.time() - os.stat(self._stamp).st_mtime < self._interval:
                return False
        except FileNotFoundError:
            pass
        self._stamp.touch()
        return True
