"""Host volumes: which host paths a claim may mount, and a mount source no tenant can redirect.

A host path is checked without following any symlink below its volume root, then opened
component by component (`O_PATH|O_NOFOLLOW`) and bind-mounted onto a directory under
STATE_DIR/mounts, which only the agent writes. The engine is given that directory, so a
tenant who later swaps a component of the original path for a symlink changes nothing the
engine mounts, on this start or on any restart of the container.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable

log = logging.getLogger("utopia_agent.volumes")

READ_ONLY_SUFFIX = ":ro"
_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class VolumeRefused(Exception):
    """A host or container path the node's policy refuses; the message says why."""


@dataclass(frozen=True)
class Volume:
    """One host path mounted into a claim's container, as checked."""

    host: str
    root: str
    target: str
    read_only: bool = False

    @property
    def beneath_root(self) -> tuple[str, ...]:
        """The components of the host path below its volume root."""
        return tuple(Path(self.host).relative_to(self.root).parts)


def within(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies below it (both normalised absolute paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def overlap(a: str, b: str) -> bool:
    return within(a, b) or within(b, a)


def encode_hosts(volumes: Iterable[Volume]) -> str:
    """The label value that records the host paths a container mounts (JSON: paths may hold commas)."""
    return json.dumps(sorted(v.host for v in volumes))


def decode_hosts(label: str) -> list[str]:
    try:
        hosts = json.loads(label)
    except ValueError:
        return []
    return [h for h in hosts if isinstance(h, str)] if isinstance(hosts, list) else []


def parse_volume(host: str, inside: str, roots: dict[str, str]) -> Volume:
    """Check one `host: inside[:ro]` entry against the volume roots (lexical, then on disk).

    `roots` maps each configured root as written and as resolved to its resolved path: a
    root may itself be a symlink set up by the operator, but nothing below it may be one.
    """
    if ".." in host.split("/"):
        raise VolumeRefused(f"{host} must not contain '..'")
    normal = os.path.normpath("/" + host.lstrip("/"))
    root = next((r for r in sorted(roots, key=len, reverse=True) if within(normal, r)), None)
    if root is None:
        raise VolumeRefused(f"{host} is outside the node's volume roots ({':'.join(sorted(set(roots.values())))})")
    if normal == root:
        raise VolumeRefused(f"{host} is a volume root itself; mount a directory inside it")
    real_root = roots[root]
    host_path = real_root.rstrip("/") + normal[len(root.rstrip("/")):]
    read_only = inside.endswith(READ_ONLY_SUFFIX)
    target = inside[: -len(READ_ONLY_SUFFIX)] if read_only else inside
    volume = Volume(host=host_path, root=real_root, target=target, read_only=read_only)
    os.close(open_beneath(volume))
    return volume


def open_beneath(volume: Volume) -> int:
    """An O_PATH descriptor of the volume's host path, reached from its root without following
    a symlink at any step; VolumeRefused when a component is missing or a symlink."""
    fd = os.open(volume.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in volume.beneath_root:
            try:
                child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                raise VolumeRefused(f"{volume.host} does not exist (the agent never creates host paths)") from None
            os.close(fd)
            fd = child
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise VolumeRefused(f"{volume.host} passes through a symlink ({part}); give the real path")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise VolumeRefused(f"{volume.host} is neither a directory nor a regular file")
        return fd
    except BaseException:
        os.close(fd)
        raise


class MountPins:
    """Bind mounts under STATE_DIR/mounts/<claim_id>/<n>: the sources the engine is given."""

    def __init__(self, root: Path):
        self.root = root

    def prepare(self) -> None:
        """Make the pins' root a tmpfs of its own, once per boot: after a reboot it comes back empty,
        so a container the engine restarts on boot finds its source missing and does not start,
        instead of mounting an empty placeholder where the tenant's data was."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        if os.path.ismount(self.root):
            return
        if _libc.mount(b"tmpfs", str(self.root).encode(), b"tmpfs", 0, b"mode=0700,size=1m") != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot mount a tmpfs on {self.root}: {os.strerror(code)}")

    def pin(self, claim_id: str, volumes: Iterable[Volume]) -> list[str]:
        """Pin each volume's host path as it is now; returns the mount sources, in order."""
        claim_dir = self.root / claim_id
        self.release(claim_id)
        claim_dir.mkdir(mode=0o700, parents=True)
        sources = []
        try:
            for number, volume in enumerate(volumes):
                sources.append(str(self._bind(volume, claim_dir / str(number))))
        except BaseException:
            self.release(claim_id)
            raise
        return sources

    @staticmethod
    def _bind(volume: Volume, point: Path) -> Path:
        fd = open_beneath(volume)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                point.mkdir(mode=0o700)
            else:
                point.touch(mode=0o600)
            if _libc.mount(f"/proc/self/fd/{fd}".encode(), str(point).encode(), None, _MS_BIND, None) != 0:
                # Only root (CAP_SYS_ADMIN) may bind; the agent needs it as it needs the engine's socket.
                code = ctypes.get_errno()
                raise OSError(code, f"cannot bind {volume.host}: {os.strerror(code)}")
        finally:
            os.close(fd)
        return point

    def release(self, claim_id: str) -> None:
        """Unmount and remove a claim's pins; safe when there are none."""
        claim_dir = self.root / claim_id
        if not claim_dir.exists():
            return
        for point in claim_dir.iterdir():
            if _libc.umount2(str(point).encode(), _MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
                log.error("cannot unmount %s: %s", point, os.strerror(ctypes.get_errno()))
                continue
            if point.is_dir():
                point.rmdir()
            else:
                point.unlink()
        try:
            claim_dir.rmdir()
        except OSError as exc:  # never removed recursively: a point still mounted holds tenant data
            log.error("cannot remove %s: %s", claim_dir, exc.strerror)

    def holds(self, claim_id: str) -> bool:
        return (self.root / claim_id).exists()

    def claims(self) -> list[str]:
        return [entry.name for entry in self.root.iterdir()] if self.root.exists() else []
