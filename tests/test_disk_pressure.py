"""Disk pressure as one worker judges it, on a real small tmpfs (no engine)."""

from __future__ import annotations

import pytest

from utopia_agent.errors import InsufficientStorage
from utopia_agent.events.history import EventHistory
from utopia_agent.node.disk_pressure import DiskPressure
from tests.support.small_filesystem import fill, small_tmpfs


def test_a_create_looks_afresh_where_polls_reuse_the_last_look(tmp_path):
    """/health and the node view reuse a look for a second; a create must not: another worker may
    already have announced the pressure that this worker's last look predates."""
    with small_tmpfs(tmp_path / "state") as state_dir:
        pressure = DiskPressure(state_dir, 10, lambda: None, EventHistory(state_dir, 100), lambda: None)
        assert pressure.pressed() == () and not pressure.refuse_if_pressed()
        fill(state_dir, mb=23)
        with pytest.raises(InsufficientStorage) as refused:
            pressure.refuse_if_pressed()
        assert refused.value.status == 507 and "the agent's state dir" in refused.value.message
        assert [fs.name for fs in pressure.pressed()] == ["state_dir"], "the create's look is the one polls reuse"
