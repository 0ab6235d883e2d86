"""The node's disk as allocation sees it: what claims may have in all, who holds how much, and a
GPU claim's share. Plain functions and one record over the node's facts, so the allocator decides
under its lock and tests can state a disk the machine lacks.

Sizes are in GB of 2^30 bytes, as the engine reads `size=1G`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import NotEnoughResources

GIB = 1024 ** 3
# Disk sizes are given and shared in steps of this much (100 MiB would be 0.09765625).
DISK_STEP_GB = 0.1
# The consumer every create counts: the claims' container disks, from their labels.
CLAIMS_CONSUMER = "claims"


def gb_of(size_bytes: int) -> float:
    """Bytes as GB, rounded down to the step (a filesystem's odd size never rounds up)."""
    return _step_down(size_bytes / GIB)


def _step_down(gb: float) -> float:
    return round(math.floor(gb / DISK_STEP_GB + 1e-9) * DISK_STEP_GB, 1)


def allocatable_gb(filesystem_bytes: int, reserved_gb: float | None) -> float:
    """What claims may have in all: the filesystem less the reserve (None: the default reserve)."""
    total = gb_of(filesystem_bytes)
    reserve = default_reserved_gb(total) if reserved_gb is None else reserved_gb
    return max(0.0, _step_down(total - reserve))


def default_reserved_gb(filesystem_gb: float) -> float:
    """15% of the filesystem, rounded up to a whole GB: kubelet's imagefs eviction mark, since the
    same filesystem holds the images, the engine's logs and the containers' metadata."""
    return float(math.ceil(filesystem_gb * 0.15))


def disk_share(allocatable: float, gpu_count: int, node_gpus: int) -> float:
    """A GPU claim's disk: the allocatable disk times gpu_count / the node's GPUs, rounded down
    to the step so the shares of all GPUs never add up to more than the allocatable disk."""
    fraction = gpu_count / max(node_gpus, gpu_count)
    return max(DISK_STEP_GB, _step_down(allocatable * fraction))


@dataclass(frozen=True)
class DiskLedger:
    """The allocatable disk and what each kind of consumer holds of it ("claims", "volumes", ...),
    in GB; read under the allocation lock, it is what a create or a volume is checked against."""

    allocatable_gb: float
    held: Mapping[str, float] = field(default_factory=dict)

    @property
    def allocated_gb(self) -> float:
        return sum(self.held.values())

    @property
    def free_gb(self) -> float:
        return max(0.0, self.allocatable_gb - self.allocated_gb)

    def check_fits(self, disk_gb: float, what: str = "a container disk") -> None:
        """Raise NotEnoughResources naming `free_disk_gb` (rounded down to 0.01) when `disk_gb` more would not fit."""
        if disk_gb > self.free_gb + 1e-9:
            free = math.floor(self.free_gb * 100 + 1e-6) / 100
            raise NotEnoughResources(f"{what} of {disk_gb:g} GB requested, {free:g} GB of disk free on the node", free_disk_gb=free)

    def as_dict(self) -> dict[str, float]:
        """The figures as `GET /api/v1/node` shows them, to the hundredth of a GB."""
        return {"allocatable_gb": round(self.allocatable_gb, 2), "allocated_gb": round(self.allocated_gb, 2), "free_gb": round(self.free_gb, 2)}
