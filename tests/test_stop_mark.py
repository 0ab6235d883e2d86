"""What a stopped claim holds and shows, read from the mark in its container's name (no engine needed)."""

from __future__ import annotations

from dataclasses import replace

from utopia_agent.claims.holders import claim_volume_users, gpu_claims, port_holders
from utopia_agent.claims.records import Holdings, ManagedContainer, StopMark, parse_claim_volumes
from utopia_agent.engine.node_view import ContainerState
from utopia_agent.events.changes import container_changes

LABELS = {"utopia.managed": "true", "utopia.claim_id": "a.b", "utopia.gpu_ids": "0,1", "utopia.gpu_uuids": "GPU-0,GPU-1",
          "utopia.ports": "31001:80/tcp", "utopia.cpus": "4", "utopia.memory_mb": "1024", "utopia.disk_gb": "20",
          "utopia.claim_volumes": "ws-1:rw,data.2:ro"}
RUNNING = ContainerState(id="c" * 64, name="utopia-a.b", image="busybox", status="running", created=100, started=101, finished=0,
                         exit_code=0, oom_killed=False, restart_count=0, error="", labels=LABELS)


def row(name: str, state: str) -> dict:
    return {"Id": "c" * 64, "Names": [f"/{name}"], "State": state, "Labels": LABELS}


def test_the_mark_names_the_reason_and_the_policy_and_only_its_own_claim():
    mark = StopMark("disk_limit_exceeded", "unless-stopped")
    assert mark.name("a.b") == "utopia_stopped.disk_limit_exceeded.unless-stopped.a.b"
    assert StopMark.parse(mark.name("a.b"), "a.b") == mark
    assert StopMark.parse(mark.name("a.b"), "b") is None, "another claim's mark"
    assert StopMark.parse("utopia-a.b", "a.b") is None
    assert StopMark.parse("utopia_stopped.requested", "a.b") is None


def test_a_stopped_container_holds_its_volumes_and_disk_and_no_gpu_port_or_cpu():
    name = StopMark("requested", "no").name("a.b")
    stopped = Holdings.of_row(row(name, "exited"))
    assert stopped.stopped and (stopped.gpu_ids, stopped.port_mappings, stopped.cpus, stopped.memory_mb) == ((), (), 0.0, 0)
    assert (stopped.disk_gb, stopped.claim_volumes) == (20.0, (("ws-1", False), ("data.2", True)))
    assert gpu_claims([stopped]) == {} and port_holders([stopped]) == {}
    assert claim_volume_users([stopped]) == {"ws-1": [("a.b", False)], "data.2": [("a.b", True)]}
    for running in (Holdings.of_row(row(name, "running")), Holdings.of_row(row("utopia-a.b", "exited"))):
        assert not running.stopped and running.gpu_ids == (0, 1) and running.cpus == 4.0, "running, or exited unmarked: holds all"


def test_the_container_object_says_stopped_and_an_eviction_says_why_in_error():
    requested = ManagedContainer.from_state(replace(RUNNING, name=StopMark("requested", "no").name("a.b"), status="exited"))
    assert requested.stopped and requested.outcome()["error"] == "" and requested.gpu_ids == (0, 1)
    evicted = ManagedContainer.from_state(replace(RUNNING, name=StopMark("disk_limit_exceeded", "no").name("a.b"), status="exited"))
    assert evicted.stopped and evicted.outcome()["error"] == "disk_limit_exceeded"
    assert not ManagedContainer.from_state(replace(RUNNING, name=StopMark("requested", "no").name("a.b"))).stopped, "still running"


def test_a_stop_is_told_once_and_a_start_asked_of_the_engine_is_started():
    marked = replace(RUNNING, name=StopMark("requested", "always").name("a.b"))
    stopped = replace(marked, status="exited", finished=105, exit_code=137)
    assert [line["action"] for line in container_changes(marked, stopped, [{"Action": "die"}])] == ["exited", "stopped"]
    assert [line["action"] for line in container_changes(stopped, stopped, [])] == []
    unmarked = replace(stopped, name="utopia-a.b")
    again = replace(unmarked, status="running", started=110, restart_count=0)
    assert [line["action"] for line in container_changes(unmarked, again, [{"Action": "start"}])] == ["started"]


def test_a_mangled_claim_volumes_label_is_skipped_entry_by_entry():
    assert parse_claim_volumes("ws:rw,bad,x:rx,:ro,ok:ro") == (("ws", False), ("ok", True))
