"""The node's mount table as /proc/<pid>/mountinfo writes it (proc(5)), read by the claims' cgroup
lookup and by the disk quota check."""

from __future__ import annotations

from collections.abc import Iterator


def mountinfo_fields(mountinfo: str) -> Iterator[tuple[list[str], int]]:
    """Each mount's fields with the index of the "-" that ends its optional fields (the filesystem
    type, source and superblock options follow it); a line without one is skipped."""
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            separator = fields.index("-")
        except ValueError:
            continue
        yield fields, separator
