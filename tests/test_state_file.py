"""The small JSON records of the state dir: replaced whole, never half written, no leftovers."""

from __future__ import annotations

import errno
import json

import pytest

from tests.support.small_filesystem import fill, small_tmpfs
from utopia_agent.node.state_file import StateFile


@pytest.mark.parametrize("durable", [True, False])
def test_a_record_is_replaced_whole_and_reads_back(tmp_path, durable):
    record = StateFile(tmp_path / "drain.json")
    assert record.read() == {}
    record.write({"draining": True, "reason": "maintenance é"}, durable=durable)
    record.write({"draining": False, "reasons": list(range(5000))}, durable=durable)
    assert record.read() == {"draining": False, "reasons": list(range(5000))}
    assert json.loads((tmp_path / "drain.json").read_text()) == record.read()
    assert [p.name for p in tmp_path.iterdir()] == ["drain.json"]


def test_a_write_that_fails_leaves_the_last_record_and_no_temporary_file(tmp_path):
    record = StateFile(tmp_path / "gpu-health.json")
    record.write({"quarantined": {"GPU-1": "xid 79"}})
    with pytest.raises(TypeError):
        record.write({"quarantined": object()})
    (tmp_path / "gone").mkdir()
    with pytest.raises(OSError):
        StateFile(tmp_path / "gone").write({"x": 1})  # a directory stands where the record goes
    assert record.read() == {"quarantined": {"GPU-1": "xid 79"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "gpu-health.json"]


def test_a_record_that_does_not_parse_reads_as_empty(tmp_path):
    (tmp_path / "drain.json").write_text("{not json")
    assert StateFile(tmp_path / "drain.json").read() == {}


def test_a_failed_announcement_puts_the_previous_record_back(tmp_path):
    """A record and its event go together: the event history refusing (a full disk) undoes the write."""
    record = StateFile(tmp_path / "drain.json")
    record.write({"reason": "first"})

    def refuse():
        raise OSError(errno.ENOSPC, "No space left on device")

    for data in ({"reason": "second"}, None):
        with pytest.raises(OSError):
            record.write_announced(data, refuse)
        assert record.read() == {"reason": "first"}
    record.remove()
    with pytest.raises(OSError):
        record.write_announced({"reason": "new"}, refuse)
    assert record.read() == {}
    announced = []
    record.write_announced({"reason": "kept"}, lambda: announced.append(1))
    assert record.read() == {"reason": "kept"} and announced == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["drain.json"]


def test_a_write_on_a_full_filesystem_fails_and_leaves_the_record_whole(tmp_path):
    with small_tmpfs(tmp_path / "state", size="1m") as state_dir:
        record = StateFile(state_dir / "gpu-health.json")
        record.write({"quarantined": {}})
        fill(state_dir)
        for durable in (True, False):
            with pytest.raises(OSError) as refused:
                record.write({"quarantined": {f"GPU-{n}": "x" * 100 for n in range(200)}}, durable=durable)
            assert refused.value.errno == errno.ENOSPC
            assert record.read() == {"quarantined": {}}
        assert sorted(p.name for p in state_dir.iterdir()) == ["fill", "gpu-health.json"]
