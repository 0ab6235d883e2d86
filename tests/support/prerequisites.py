"""What a test needs from the machine: skipped where it is missing, a failure under CI=true."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Go on if `condition` holds; otherwise skip, except in CI, where no Docker-backed test may skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing in CI: {reason}")
    pytest.skip(reason)
