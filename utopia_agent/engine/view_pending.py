"""Changes made under the allocation lock that the node view may not show yet.

An allocation decides on the node view instead of listing the engine (9 ms at 100 claims,
against a create's 200) only when the view shows every change that gives a container its
claim's name: its create, and its start after a stop (which renames it back). Either gives
the container GPUs, ports and CPUs that a view a few milliseconds behind would call free.

Each such change leaves an empty file in STATE_DIR/view-pending/, named `<claim>@<token>`,
made before the engine is asked (under the lock). It goes once it no longer matters:
- the worker that made the change removes it when its own wait for the view sees the container;
- the next holder of the lock removes it when the view shows the claim's container by the
  claim's name (a container of that name made later means this one's events were seen
  first);
- a holder whose decision lists the engine, because the view does not show a note, removes
  the notes of claims the list shows no container for (the change failed, or the container
  went: a container that is gone holds nothing). The others stay: a list tells the holder
  that lists, and no one after it, what the view lacks.
The engine is never asked about a note alone: an inspect waits for a container's lock, which
its start holds for the whole start, and under the allocation lock that would serialise
concurrent creates behind each other's starts.

A file costs an inode, never a block, and is made and removed without fsync: after a crash of
the node the engine restarts too, and the view syncs from a list before it is trusted again.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Protocol
from collections.abc import Iterable

from ..claims.records import CLAIM_LABEL, ContainerState, container_name

log = logging.getLogger("utopia_agent.view")

# Claim ids never hold it (schemas.CLAIM_ID_PATTERN): a file's claim is what comes before it.
SEPARATOR = "@"
# This process's notes of changes the view never showed (a container left created and never
# started) are forgotten all at once past this many: their files stay for a list to clear.
MAX_MINE = 4096


class ShowsClaims(Protocol):
    """What a published view answers (node_view.Snapshot)."""

    def labelled(self, key: str, value: str) -> list[ContainerState]: ...


class PendingChanges:
    """The directory of changes the view may not show yet, and this process's own among them."""

    def __init__(self, directory: Path):
        self._directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        self._tokens = itertools.count()
        # Container id -> the file of the change this process made to it, until the view shows it.
        self._mine: dict[str, str] = {}
        self._lock = threading.Lock()

    def expect(self, claim_id: str) -> str:
        """Note, before asking the engine, a change that gives the claim's container its claim's
        name; the caller holds the allocation lock. Returns the note, for `made`."""
        note = f"{claim_id}{SEPARATOR}{os.getpid()}.{next(self._tokens)}"
        os.close(os.open(self._directory / note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return note

    def made(self, container_id: str, note: str) -> None:
        """The change noted as `note` was made to `container_id`: its note goes once this process sees the view show it."""
        with self._lock:
            if len(self._mine) >= MAX_MINE:
                self._mine = {}
            self._mine[container_id] = note

    def seen(self, container_id: str) -> None:
        """The view showed `container_id` as it is now: whatever this process changed of it before is in the view."""
        with self._lock:
            note = self._mine.pop(container_id, None)
        if note is not None:
            self._remove([note])

    def notes(self) -> list[str]:
        """Every change noted and not yet known to be shown; read under the allocation lock."""
        try:
            return [entry.name for entry in os.scandir(self._directory) if SEPARATOR in entry.name]
        except FileNotFoundError:
            return []

    def shown_by(self, view: ShowsClaims, notes: list[str]) -> bool:
        """True when `view` shows every noted change, each claim's container by its claim's name;
        the notes it shows are removed. The caller holds the allocation lock."""
        shown = [note for note in notes if _shows(view, _claim_of(note))]
        self._remove(shown)
        return len(shown) == len(notes)

    def listed(self, notes: list[str], names: Iterable[str]) -> None:
        """The engine's list, taken after `notes` were read, shows containers by these names: a note
        whose claim has no container of its name goes (the change failed, or the container went,
        and a container that is gone holds nothing); the others stay until the view shows them."""
        names = set(names)
        self._remove([note for note in notes if container_name(_claim_of(note)) not in names])

    def _remove(self, notes: Iterable[str]) -> None:
        for note in notes:
            try:
                os.unlink(self._directory / note)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the next holder of the lock lists the engine instead
                log.warning("a pending change's note could not be removed note=%s reason=%s", note, exc.strerror)


def _claim_of(note: str) -> str:
    return note.rpartition(SEPARATOR)[0]


def _shows(view: ShowsClaims, claim_id: str) -> bool:
    name = container_name(claim_id)
    return any(state.name == name for state in view.labelled(CLAIM_LABEL, claim_id))
