"""Claim volumes as the API sees them: made (within the node's allocatable disk) and removed under
the allocation lock, with the claims that mount them read from the engine, and each change in the
node's event history.

The engine's labels say which claim mounts which volume (`utopia.claim_volumes`): a delete
reads them afresh under the lock, so no create can mount a volume while it is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

from ..claims.holders import claim_volume_users
from ..claims.records import CLAIM_VOLUMES_LABEL
from ..engine.manager import DockerManager
from ..claims.disks import DiskLedger
from ..errors import VolumeExists, VolumeInUse
from ..events.changes import volume_change
from ..events.history import EventHistory
from ..volumes.schemas import VolumeSchema
from ..volumes.store import ClaimVolume, VolumeStore

log = logging.getLogger("utopia_agent.claim_volumes")
_volume = VolumeSchema()


class ClaimVolumes:
    def __init__(self, store: VolumeStore, docker: DockerManager, lock: Callable[[], AbstractContextManager], history: EventHistory,
                 disk: Callable[[], DiskLedger]):
        self.store = store
        self._docker = docker
        self._lock = lock
        self._history = history
        self._disk = disk

    def create(self, name: str, size_gb: int) -> ClaimVolume:
        """Make a volume whose size fits the node's free allocatable disk (409 not_enough_resources
        with `free_disk_gb`), decided under the lock that claims' disks are decided under too."""
        with self._lock():
            if self.store.exists(name):
                raise VolumeExists(f"volume {name} exists", volume=name)
            self._disk().check_fits(size_gb, what="a volume")
            volume = self.store.create(name, size_gb)
        self._history.record([volume_change("created", _volume.dump(volume))])
        return volume

    def list(self) -> list[ClaimVolume]:
        users = self._users_listed()
        return [self._with_claims(volume, users) for volume in self.store.list()]

    def get(self, name: str) -> ClaimVolume:
        return self._with_claims(self.store.get(name), self._users_listed())

    def delete(self, name: str) -> ClaimVolume:
        """Remove a volume no claim mounts: 409 volume_in_use naming one that does (running or stopped)."""
        with self._lock():
            volume = self.store.get(name)
            users = claim_volume_users(self._docker.holders_of(CLAIM_VOLUMES_LABEL)).get(name, [])
            if users:
                claims = sorted({claim for claim, _ in users})
                raise VolumeInUse(f"volume {name} is mounted by claim {', '.join(claims)}", volume=name, claim_id=claims[0])
            self.store.remove(name)
        self._history.record([volume_change("removed", {"name": name})])
        return volume

    def _users_listed(self) -> dict[str, list[tuple[str, bool]]]:
        return claim_volume_users(container.holdings for container in self._docker.list_managed())

    @staticmethod
    def _with_claims(volume: ClaimVolume, users: dict[str, list[tuple[str, bool]]]) -> ClaimVolume:
        return replace(volume, claims=tuple(sorted({claim for claim, _ in users.get(volume.name, [])})))
