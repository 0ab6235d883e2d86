"""Claim volumes on disk: one folder per volume under the volumes dir, its record first.

`<dir>/<name>/volume.json` is written before anything else of a volume is made, and removed
last: a crash halfway through a create or a delete leaves a folder that the list shows (with
`ready` false, or being deleted) and that a delete removes. At start, `settle` finishes what
was interrupted (a create is made again from its record, a delete is carried through) and mounts
every volume; the gunicorn master does it before any worker runs. Callers hold the allocation
lock for every change, so two workers never make or remove the same volume at once.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InsufficientStorage, NodeFault, VolumeExists, VolumeNotFound
from ..node.state_file import StateFile
from .backends import Backend, BackendFailed, BtrfsBackend, LoopBackend, choose_backend, on_btrfs

log = logging.getLogger("utopia_agent.claim_volumes")

GIB = 1024**3
RECORD = "volume.json"


@dataclass(frozen=True)
class ClaimVolume:
    """A volume as its record and its filesystem show it; `claims` is filled in by who knows the containers."""

    name: str
    size_gb: int
    created: int
    backend: str
    ready: bool
    used_mb: int | None
    claims: tuple[str, ...] = ()


class VolumeStore:
    def __init__(self, root: Path, wanted_backend: str = "auto"):
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._backends: dict[str, Backend] = {"loop": LoopBackend()}
        if on_btrfs(root):
            self._backends["btrfs"] = BtrfsBackend(root)
        self.backend = choose_backend(root, wanted_backend).name

    def _folder(self, name: str) -> Path:
        return self.root / name

    def _record(self, name: str) -> StateFile:
        return StateFile(self._folder(name) / RECORD)

    def create(self, name: str, size_gb: int) -> ClaimVolume:
        """Make a volume: the record (not ready), then its filesystem, then the record ready."""
        folder = self._folder(name)
        if self._record(name).read():
            raise VolumeExists(f"volume {name} exists", volume=name)
        # A folder without a record is a create that died before its first write: nothing in it.
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientStorage(f"no room to make the volume {name} in {self.root}; nothing of it is left") from None
            raise
        record = {"name": name, "size_gb": size_gb, "created": int(time.time()), "backend": self.backend, "ready": False}
        try:
            self._record(name).write(record)
            self._backends[self.backend].make(folder, size_gb * GIB)
            self._record(name).write({**record, "ready": True})
        except (OSError, BackendFailed) as exc:
            log.error("volume create failed volume=%s reason=%s", name, exc)
            self._remove_folder(name, record)
            if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc):
                raise InsufficientStorage(f"no room to make the volume {name} in {self.root}; nothing of it is left") from None
            raise NodeFault(f"the volume {name} could not be made: {exc}") from None
        log.info("volume created volume=%s size_gb=%d backend=%s", name, size_gb, self.backend)
        return self.get(name)

    def exists(self, name: str) -> bool:
        return bool(self._record(name).read())

    def get(self, name: str) -> ClaimVolume:
        record = self._record(name).read()
        if not record:
            raise VolumeNotFound(f"no volume {name!r}", volume=name)
        return self._shown(record)

    def list(self) -> list[ClaimVolume]:
        names = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir() and (Path(entry.path) / RECORD).exists())
        return [self._shown(record) for name in names if (record := self._record(name).read())]

    def source(self, name: str) -> str:
        """The host path a claim's container mounts for the volume: 404 for one that does not exist or
        is not whole (an interrupted create or delete)."""
        record = self._record(name).read()
        if not record or not record.get("ready") or record.get("deleting"):
            raise VolumeNotFound(f"no volume {name!r}" if not record else f"volume {name} is not ready (an interrupted create or delete)",
                                 volume=name)
        backend, folder = self._backend_of(record), self._folder(name)
        backend.mount(folder)
        return str(backend.data_path(folder))

    def remove(self, name: str) -> None:
        """Remove a volume (the caller checked no claim mounts it): marked first, so a crash shows it still."""
        record = self._record(name).read()
        if not record:
            raise VolumeNotFound(f"no volume {name!r}", volume=name)
        self._record(name).write({**record, "deleting": True})
        self._remove_folder(name, record)
        log.info("volume removed volume=%s", name)

    def _remove_folder(self, name: str, record: dict) -> None:
        folder = self._folder(name)
        try:
            self._backend_of(record).remove(folder)
        except BackendFailed as exc:
            raise NodeFault(f"the volume {name} could not be removed: {exc}") from None
        for entry in folder.iterdir():
            if entry.name != RECORD:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (folder / RECORD).unlink(missing_ok=True)
        folder.rmdir()

    def settle(self) -> None:
        """At start, before any worker runs: carry through the deletes and creates a crash interrupted, and mount every volume."""
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            name, record = entry.name, self._record(entry.name).read()
            try:
                if not record:  # a create that died before its record: its folder is empty
                    self._folder(name).rmdir()
                    continue
                if record.get("deleting"):
                    log.warning("finishing an interrupted delete volume=%s", name)
                    self._remove_folder(name, record)
                elif not record.get("ready"):
                    log.warning("finishing an interrupted create volume=%s", name)
                    backend = self._backend_of(record)
                    backend.remove(self._folder(name))
                    backend.make(self._folder(name), int(record["size_gb"]) * GIB)
                    self._record(name).write({**record, "ready": True})
                else:
                    self._backend_of(record).mount(self._folder(name))
            except (OSError, BackendFailed, NodeFault) as exc:
                log.error("volume not settled volume=%s reason=%s", name, exc)

    def unmount_all(self) -> None:
        """Unmount every volume (tests, and an operator taking the node apart): nothing is lost."""
        for volume in self.list():
            self._backends[volume.backend].unmount(self._folder(volume.name))

    def _backend_of(self, record: dict) -> Backend:
        backend = self._backends.get(record.get("backend", "loop"))
        if backend is None:
            raise NodeFault(f"volume {record.get('name')} is on {record.get('backend')}, which {self.root} is not")
        return backend

    def _shown(self, record: dict) -> ClaimVolume:
        name = record["name"]
        backend = self._backends.get(record.get("backend", "loop"))
        used = backend.used_bytes(self._folder(name)) if backend is not None and record.get("ready") else None
        return ClaimVolume(
            name=name,
            size_gb=int(record["size_gb"]),
            created=int(record["created"]),
            backend=record.get("backend", "loop"),
            ready=bool(record.get("ready")) and not record.get("deleting"),
            used_mb=used // (1024 * 1024) if used is not None else None,
        )
