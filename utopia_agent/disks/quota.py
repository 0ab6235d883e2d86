"""Which way a claim's disk size is enforced on this node: UTOPIA_AGENT_DISK_QUOTA against what the
engine's storage driver can do.

Decided from the engine's `info` (driver, backing filesystem) and, for overlay2 on XFS, the mount
options of the filesystem under the data root, so no throwaway container is made at each start:
moby's overlay2 takes `size` only on XFS mounted with project quotas (pquota shows as `prjquota`);
btrfs (qgroups, which the driver enables itself) and zfs (dataset quotas) always take it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..node.mountinfo import mountinfo_fields

ENGINE, MEASURED, OFF = "engine", "measured", "off"
# Storage drivers whose containers take `storage_opt={"size": ...}` whatever they sit on.
SIZED_DRIVERS = ("btrfs", "zfs")
PROJECT_QUOTA_OPTIONS = ("prjquota", "pquota")


class EngineCannotEnforce(Exception):
    """UTOPIA_AGENT_DISK_QUOTA=engine, and the engine cannot enforce sizes; the message says why."""


@dataclass(frozen=True)
class QuotaMode:
    """The mode in force (engine, measured or off) and why the engine can or cannot enforce sizes."""

    mode: str
    engine_reason: str


def engine_refusal(driver: str, backing_filesystem: str, mount_options: frozenset[str] | None) -> str | None:
    """Why the engine cannot take a container's `size` (None: it can)."""
    if driver in SIZED_DRIVERS:
        return None
    if driver == "overlay2":
        if backing_filesystem != "xfs":
            return f"the engine's overlay2 sits on {backing_filesystem or 'an unknown filesystem'}; sizes need XFS mounted with pquota"
        if mount_options is None:
            return "the agent cannot see the mount under the engine's data root, to tell whether XFS has pquota"
        if not mount_options & set(PROJECT_QUOTA_OPTIONS):
            return "the engine's overlay2 sits on XFS mounted without pquota"
        return None
    return f"the engine's storage driver {driver or 'unknown'} takes no container size (overlay2 on XFS with pquota, btrfs and zfs do)"


def resolve(setting: str, refusal: str | None) -> QuotaMode:
    """The mode in force for UTOPIA_AGENT_DISK_QUOTA=`setting`; EngineCannotEnforce for `engine` where the engine cannot."""
    reason = refusal or "the engine's storage driver enforces sizes"
    if setting == "engine" and refusal is not None:
        raise EngineCannotEnforce(refusal)
    if setting == "auto":
        return QuotaMode(ENGINE if refusal is None else MEASURED, reason)
    return QuotaMode(setting, reason)


def mount_options_of(path: str, mountinfo: str) -> frozenset[str] | None:
    """The mount and superblock options of the filesystem holding `path`, from a mountinfo text
    (/proc/self/mountinfo); None when no mount holds it."""
    real = os.path.realpath(path)
    best: tuple[int, frozenset[str]] | None = None
    for fields, separator in mountinfo_fields(mountinfo):
        point = fields[4].replace("\\040", " ")
        if real == point or real.startswith(point.rstrip("/") + "/"):
            options = frozenset(fields[5].split(",") + (fields[separator + 3].split(",") if len(fields) > separator + 3 else []))
            if best is None or len(point) >= best[0]:
                best = (len(point), options)
    return best[1] if best else None
