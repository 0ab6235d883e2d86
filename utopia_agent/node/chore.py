"""The node's jobs that one worker does for all (samplers, the janitor's sweep, image collection).

Every worker starts the job's thread; the one that holds the job's role (role.py) does it, and
the others sleep in the kernel until the holder dies or stops: a node of N workers wakes once per
round, not N times. A chore also keeps a stamp in the state dir, so a new holder, or a restarted
agent, does it when it falls due and not again at once. A round that fails is logged and the
next one is tried at its time: the engine down is a warning (the round is skipped), a failure of
the node's own files an error.
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


class RoleJob(Background):
    """A Background whose work only the holder of its role (`<name>.lock` in the state dir) does."""

    def __init__(self, name: str, state_dir: Path):
        super().__init__(name)
        self._role = NodeRole(state_dir / f"{name}.lock")

    def _await_role(self) -> bool:
        """Asleep in the kernel, without the GIL, until this worker holds the role; False once closed."""
        self._role.take(block=True)
        return not self._closed.is_set()


class NodeSampler(RoleJob):
    """Figures sampled for the whole node: every worker runs one, the worker holding the node's role
    `<name>.lock` samples, every `tick` seconds, into `<name>.json` in the state dir, and every
    worker answers from that file. A round that fails is logged as `not_sampled` says: the engine
    down at debug, a failure of the node's own files as a warning."""

    def __init__(self, name: str, state_dir: Path, tick: float, logger: logging.Logger, not_sampled: str):
        super().__init__(name, state_dir)
        self._samples = SampleFile(state_dir / f"{name}.json")
        self._tick = tick
        self._log = logger
        self._not_sampled = not_sampled

    def samples(self) -> dict:
        """The last node-wide figures: {"time": unix, "claims": {container id: {...}}}; re-read only when the file changed."""
        return self._samples.read()

    def _sample_round(self) -> object:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._closed.wait(self._tick) and self._await_role():
            try:
                self._sample_round()
            except AgentError as error:
                self._log.debug(self._not_sampled, error.message)
            except OSError as error:
                self._log.warning(self._not_sampled, error)
        self._role.release()


class NodeChore(RoleJob):
    def __init__(self, name: str, stamp: Path, interval: float, chore: Callable[[], None], at_start: bool = False):
        """The role is `<name>.lock` beside `stamp`. `at_start`: look at once when the worker starts,
        rather than after half an interval."""
        super().__init__(name, stamp.parent)
        self._stamp = stamp
        self._interval = interval
        self._chore = chore
        self._at_start = at_start

    def _run(self) -> None:
        if not self._at_start and self._closed.wait(self._interval / 2):
            return
        while self._await_role():
            try:
                wait = self._until_due()
                if wait <= 0:
                    self._stamp.touch()
                    self.run_now()
                    wait = self._interval
            except OSError as error:  # the stamp cannot be renewed (a full state dir): look again later
                log.warning("%s skipped: %s", self._name, error.strerror or error)
                wait = self._interval / 2
            if self._closed.wait(wait):
                break
        self._role.release()

    def run_now(self) -> None:
        """One round of the chore in the caller's thread, its failures logged as the loop's are."""
        try:
            self._chore()
        except AgentError as error:
            log.warning("%s skipped: %s", self._name, error.message)
        except OSError as error:
            log.error("%s failed: %s", self._name, error)

    def _until_due(self) -> float:
        """Seconds until the chore is due by its stamp (0 or less: now). A stamp from the future (the
        wall clock stepped back) is renewed now, where waiting for its time would stop the chore."""
        try:
            age = time.time() - os.stat(self._stamp).st_mtime
        except FileNotFoundError:
            return 0.0
        if age < 0:
            self._stamp.touch()
            return self._interval
        return self._interval - age
