"""The node's disk for claims: the filesystem holding the engine's data root, as the engine sees
it, less the reserve; who holds how much of it; and the quota mode in force.

The size that matters is the engine's view of its data root. The agent reads it with statvfs of
`DockerRootDir` in its own mount namespace, and first checks that it sees the engine's tree
there (the driver's directory, e.g. /var/lib/docker/overlay2, exists): the agent runs on the
host beside the engine (deploy/ installs it so), and an agent in a container must have the
data root bind-mounted at the same path, which measured mode needs anyway to read writable
layers. Where the check fails the agent says so (creates are 500 node_fault naming the path, `check` fails) rather than
size the disk from a path that is not the engine's. Asking the engine itself was weighed: a
helper container running `df` costs a container and an image per look, and the engine's API
never says its own pid, which /proc/<pid>/root would need.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..claims.disks import CLAIMS_CONSUMER, DiskLedger, allocatable_gb
from ..claims.records import Holdings
from ..config import Config
from ..engine.manager import DockerManager, EngineStorage
from ..errors import NodeFault
from . import quota
from .quota import QuotaMode

log = logging.getLogger("utopia_agent.disks")
MOUNTINFO = Path("/proc/self/mountinfo")


def visible_data_root(storage: EngineStorage) -> str:
    """The engine's data root, once the agent sees the engine's tree there; NodeFault otherwise."""
    root = storage.data_root
    if not root or not os.path.isdir(os.path.join(root, storage.driver or ".")):
        raise NodeFault(
            f"the agent does not see the engine's data root {root or '(unknown)'} with its {storage.driver or 'storage'} "
            "directory: run the agent beside the engine, or bind-mount the data root at the same path"
        )
    return root


class NodeDisk:
    """What the node's disk allows claims, one per process. Other kinds of consumers of the same
    allocatable disk (claim volumes) join with `add_consumer`; every create and every such
    consumer's own allocation is checked against `ledger()` under the allocation lock."""

    def __init__(self, config: Config, docker: DockerManager, mountinfo: Path = MOUNTINFO):
        self._config = config
        self._docker = docker
        self._mountinfo = mountinfo
        self._consumers: dict[str, Callable[[], float]] = {}
        self._mode: QuotaMode | None = None
        self._mode_lock = threading.Lock()

    def add_consumer(self, name: str, held_gb: Callable[[], float]) -> None:
        """Count what `held_gb()` says (GB allocated to `name`, e.g. "volumes") in every ledger;
        it is called under the allocation lock, so it should read the engine, not a cache."""
        if name == CLAIMS_CONSUMER or name in self._consumers:
            raise ValueError(f"a disk consumer named {name!r} is already counted")
        self._consumers[name] = held_gb

    def filesystem_bytes(self) -> tuple[int, int]:
        """(size, free) in bytes of the filesystem holding the engine's data root."""
        stat = os.statvfs(visible_data_root(self._docker.storage()))
        return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize

    def allocatable_gb(self) -> float:
        return allocatable_gb(self.filesystem_bytes()[0], self._config.reserved_disk_gb)

    def ledger(self, claims: Iterable[Holdings]) -> DiskLedger:
        """The allocatable disk and what the claims (`claims`: every managed container's holdings,
        stopped ones included: their writable layers stay) and every other consumer hold."""
        held = {CLAIMS_CONSUMER: sum(h.disk_gb for h in claims)}
        held.update((name, held_gb()) for name, held_gb in self._consumers.items())
        return DiskLedger(self.allocatable_gb(), held)

    def describe(self, claims: Iterable[Holdings]) -> dict[str, Any]:
        """`GET /api/v1/node`'s `disk`: the mode in force, the ledger's figures and the pressure flag."""
        return {"quota": self.quota().mode, **self.ledger(claims).as_dict(), "pressure": self.under_pressure()}

    def under_pressure(self) -> bool:
        """Whether the data root's or the state dir's filesystem is short of free space; the
        pressure side of issue 32 (UTOPIA_AGENT_DISK_PRESSURE_PERCENT) decides it here, and until
        then no filesystem counts as short."""
        return False

    def quota(self) -> QuotaMode:
        """The mode in force, decided on first use (see quota.py) and kept: it changes only when
        dockerd restarts with another driver."""
        with self._mode_lock:
            if self._mode is None:
                self._mode = quota_in_force(self._config.disk_quota, self._docker.storage(), self._mountinfo)
                log.info("disk quota mode=%s setting=%s reason=%s", self._mode.mode, self._config.disk_quota, self._mode.engine_reason)
            return self._mode


def quota_in_force(setting: str, storage: EngineStorage, mountinfo: Path = MOUNTINFO) -> QuotaMode:
    """UTOPIA_AGENT_DISK_QUOTA=`setting` on this engine; EngineCannotEnforce for `engine` where it cannot."""
    try:
        options = quota.mount_options_of(storage.data_root, mountinfo.read_text())
    except OSError:
        options = None
    return quota.resolve(setting, quota.engine_refusal(storage.driver, storage.backing_filesystem, options))
