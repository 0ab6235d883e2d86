"""Waiting for something that happens in another process."""

from __future__ import annotations

import time


def wait_for(check, timeout: float, interval: float = 0.2):
    """Poll `check` until it returns something truthy; return that, or the last falsy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)
