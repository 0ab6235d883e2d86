"""A small tmpfs to fill to the last byte: what the agent does when its state dir's filesystem is full."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.prerequisites import require


@contextmanager
def small_tmpfs(path: Path, size: str = "24m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (made if missing), unmounted whatever happens."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, name: str = "fill", mb: int | None = None) -> Path:
    """Write zeros into `path`/`name`: `mb` megabytes, or until the filesystem refuses (it is then
    full to the last byte)."""
    count = [f"count={mb}"] if mb is not None else []
    subprocess.run(["dd", "if=/dev/zero", f"of={path / name}", "bs=1M" if mb is not None else "bs=64k", *count], capture_output=True, check=False)
    if mb is None:
        assert os.statvfs(path).f_bavail == 0, f"{path} is not full"
    return path / name
