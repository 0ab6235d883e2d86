"""How a claim volume gets a hard size from the kernel: a loop-mounted filesystem in a sparse
file, or a btrfs subvolume under a qgroup limit.

Each backend keeps everything of one volume inside the volume's own folder, so removing the
folder (after `remove`) leaves nothing behind. A write past the size fails with ENOSPC (loop)
or EDQUOT (btrfs) in the container that writes, and touches no other filesystem.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("utopia_agent.claim_volumes")

BTRFS_MAGIC = 0x9123683E
COMMAND_TIMEOUT = 120.0


class BackendFailed(Exception):
    """A command of the backend failed; the message names it and its error output."""


def run(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendFailed(f"{command[0]}: {exc}") from None
    if done.returncode != 0:
        raise BackendFailed(f"{' '.join(command[:2])} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def on_btrfs(path: Path) -> bool:
    """Whether `path` lies on btrfs (the filesystem's magic, as statfs gives it)."""
    try:
        output = run("stat", "-f", "-c", "%t", str(path))
    except BackendFailed:
        return False
    return int(output.strip() or "0", 16) == BTRFS_MAGIC


class LoopBackend:
    """A sparse file of the volume's size holding ext4, loop-mounted on the volume's `mnt`.

    The data the container sees is `mnt/data`, made only inside the mounted filesystem: while the
    filesystem is not mounted (after a reboot, before the agent starts) that path does not exist,
    so the engine refuses to start a container on it rather than let it write to the disk below.
    `mount -o loop` gives the loop device the autoclear flag: the unmount frees it.
    """

    name = "loop"

    def make(self, folder: Path, size_bytes: int) -> None:
        image = folder / "disk.img"
        with open(image, "wb") as sparse:
            sparse.truncate(size_bytes)
        # No blocks reserved for root (-m 0): the tenant gets the whole size; lazy init makes it instant.
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(image))
        self.mount(folder)
        data = self.data_path(folder)
        data.mkdir(exist_ok=True)
        os.chmod(data, 0o777)  # as an emptyDir: the job may run as any user

    def mount(self, folder: Path) -> None:
        mountpoint = folder / "mnt"
        mountpoint.mkdir(exist_ok=True)
        if not os.path.ismount(mountpoint):
            run("mount", "-o", "loop,nosuid,nodev", str(folder / "disk.img"), str(mountpoint))

    def unmount(self, folder: Path) -> None:
        mountpoint = folder / "mnt"
        if os.path.ismount(mountpoint):
            run("umount", str(mountpoint))

    def remove(self, folder: Path) -> None:
        self.unmount(folder)

    def mounted(self, folder: Path) -> bool:
        return os.path.ismount(folder / "mnt")

    def data_path(self, folder: Path) -> Path:
        return folder / "mnt" / "data"

    def used_bytes(self, folder: Path) -> int | None:
        if not self.mounted(folder):
            return None
        stat = os.statvfs(folder / "mnt")
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


class BtrfsBackend:
    """A btrfs subvolume per volume, its size a qgroup limit (quotas are enabled on the filesystem once)."""

    name = "btrfs"

    def __init__(self, root: Path):
        self._root = root
        self._quota_on = False

    def make(self, folder: Path, size_bytes: int) -> None:
        if not self._quota_on:
            run("btrfs", "quota", "enable", str(self._root))
            self._quota_on = True
        data = self.data_path(folder)
        if not data.exists():
            run("btrfs", "subvolume", "create", str(data))
        run("btrfs", "qgroup", "limit", str(size_bytes), str(data))
        os.chmod(data, 0o777)

    def mount(self, folder: Path) -> None:
        """Nothing to mount: the subvolume is part of the filesystem the volumes folder is on."""

    def unmount(self, folder: Path) -> None:
        """Nothing to unmount."""

    def remove(self, folder: Path) -> None:
        data = self.data_path(folder)
        if data.exists():
            run("btrfs", "subvolume", "delete", str(data))

    def mounted(self, folder: Path) -> bool:
        return self.data_path(folder).is_dir()

    def data_path(self, folder: Path) -> Path:
        return folder / "data"

    def used_bytes(self, folder: Path) -> int | None:
        data = self.data_path(folder)
        if not data.is_dir():
            return None
        try:
            output = run("btrfs", "qgroup", "show", "-f", "--raw", str(data))
        except BackendFailed:
            return None
        # The last line: "0/<subvolume id>  <referenced>  <exclusive>".
        match = re.search(r"^\S+/\d+\s+(\d+)\s+(\d+)", output.strip().splitlines()[-1]) if output.strip() else None
        return int(match.group(1)) if match else None


Backend = LoopBackend | BtrfsBackend


def choose_backend(root: Path, wanted: str) -> Backend:
    """`auto`: btrfs where the volumes folder is on btrfs, else loop; `loop` or `btrfs` as told
    (btrfs refused elsewhere, so the agent stops at start naming the variable)."""
    btrfs = on_btrfs(root)
    if wanted == "btrfs" and not btrfs:
        raise ConfigError("UTOPIA_AGENT_CLAIM_VOLUME_BACKEND", f"btrfs, but the claim volumes dir {root} is not on btrfs")
    if wanted == "btrfs" or (wanted == "auto" and btrfs):
        return BtrfsBackend(root)
    return LoopBackend()
