"""The small JSON records of the state dir: replaced whole, never half written, no leftovers."""

from __future__ import annotations

import json

import pytest

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
