"""The event history in the state dir: numbering, bounds, readers across rotations, and what a container's change becomes."""

from __future__ import annotations

import errno
import json
import multiprocessing
import socket
import threading
import time
from dataclasses import replace
from functools import partial

import pytest

from tests.support.small_filesystem import fill, small_tmpfs
from utopia_agent.claims.records import ContainerState
from utopia_agent.errors import InvalidRequest, RevisionTooOld
from utopia_agent.events.changes import container_changes, exit_line
from utopia_agent.events.history import EventHistory, HistoryGap
from utopia_agent.events.stream import ChangeNotifier, hung_up, stream_lines


def change(n: int) -> dict:
    return {"kind": "node", "action": "drain", "object": {"n": n}}


def revisions(lines: list[bytes]) -> list[int]:
    return [json.loads(line)["revision"] for line in lines]


def test_revisions_start_at_one_and_grow_across_instances(tmp_path):
    assert EventHistory(tmp_path, 10).revision() == 0
    assert EventHistory(tmp_path, 10).record([change(1), change(2)]) == 2
    again = EventHistory(tmp_path, 10)  # an agent restarted on the same state dir
    assert again.record([change(3)]) == 3
    assert revisions(again.reader(0).read()) == [1, 2, 3]


def test_the_bound_is_exact_whatever_is_on_disk(tmp_path):
    history = EventHistory(tmp_path, 3)
    for n in range(10):
        history.record([change(n)])
    assert revisions(history.reader(7).read()) == [8, 9, 10]
    with pytest.raises(RevisionTooOld) as too_old:
        history.reader(6)
    assert too_old.value.details["revision"] == 10
    with pytest.raises(InvalidRequest):
        history.reader(11)
    assert history.reader(10).read() == [] and history.reader(None).after == 10


def _append(state_dir, count):
    history = EventHistory(state_dir, 1000)
    for n in range(count):
        history.record([change(n)])


def test_processes_appending_at_once_get_one_revision_each(tmp_path):
    workers = [multiprocessing.Process(target=_append, args=(tmp_path, 50)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert revisions(EventHistory(tmp_path, 1000).reader(0).read()) == list(range(1, 201))


def test_a_reader_follows_one_rotation_exactly_and_stops_rather_than_skip_two(tmp_path):
    history = EventHistory(tmp_path, 2)
    history.record([change(1)])
    reader = history.reader(0)
    assert revisions(reader.read()) == [1]
    history.record([change(2), change(3)])  # the current file is full: it becomes the previous one
    history.record([change(4)])
    assert revisions(reader.read()) == [2, 3, 4]
    behind = history.reader(4)
    for n in range(6):
        history.record([change(n)])  # three more rotations while this reader sleeps
    with pytest.raises(HistoryGap):
        behind.read()


def test_a_stream_sends_a_new_change_as_it_comes(tmp_path):
    history = EventHistory(tmp_path, 10)
    stopping = threading.Event()
    lines = stream_lines(history.reader(None), ChangeNotifier(history.folder), 60, stopping, first_heartbeat=True)
    assert next(lines) == b""
    assert json.loads(next(lines)) == {"revision": 0, "time": pytest.approx(0, abs=1e10), "kind": "heartbeat"}
    threading.Timer(0.2, history.record, ([change(1)],)).start()
    assert revisions([next(lines)]) == [1]
    stopping.set()
    assert list(lines) == []


RUNNING = ContainerState(
    id="c" * 64, name="utopia-claim", image="busybox", status="running", created=100, started=101, finished=0,
    exit_code=0, oom_killed=False, restart_count=0, error="", labels={"utopia.managed": "true", "utopia.claim_id": "claim"},
)


def actions(lines):
    return [(line["action"], line.get("exit_code"), line.get("oom_killed")) for line in lines]


def test_a_create_and_start_seen_at_once_are_two_changes():
    assert actions(container_changes(None, RUNNING, [])) == [("created", None, None), ("started", None, None)]
    created = replace(RUNNING, status="created", started=0)
    assert actions(container_changes(None, created, [])) == [("created", None, None)]
    assert actions(container_changes(created, RUNNING, [{"Action": "start"}])) == [("started", None, None)]


def test_an_exit_carries_its_code_and_oom():
    exited = replace(RUNNING, status="exited", finished=105, exit_code=137, oom_killed=True)
    assert actions(container_changes(RUNNING, exited, [{"Action": "oom"}, {"Action": "die"}])) == [("exited", 137, True)]
    short = container_changes(None, replace(exited, exit_code=3, oom_killed=False), [])
    assert actions(short) == [("created", None, None), ("started", None, None), ("exited", 3, False)]


def test_a_restart_by_the_policy_is_an_exit_then_a_restart():
    again = replace(RUNNING, started=110, restart_count=1)
    die = {"Action": "die", "Actor": {"Attributes": {"exitCode": "1"}}}
    assert actions(container_changes(RUNNING, again, [die, {"Action": "start"}])) == [("exited", 1, False), ("restarted", None, None)]


def test_a_container_waiting_for_its_restart_has_exited_not_restarted():
    die = {"Action": "die", "Actor": {"Attributes": {"exitCode": "1"}}}
    waiting = replace(RUNNING, status="restarting", restart_count=1, exit_code=1, finished=105)
    assert actions(container_changes(RUNNING, waiting, [die])) == [("exited", 1, False)]
    running = replace(waiting, status="running", started=106)
    assert actions(container_changes(waiting, running, [{"Action": "start"}])) == [("restarted", None, None)]


def test_a_removal_names_the_container_and_its_claim():
    lines = container_changes(RUNNING, None, [{"Action": "die", "Actor": {"Attributes": {"exitCode": "143"}}}, {"Action": "destroy"}])
    assert actions(lines) == [("exited", 143, False), ("removed", None, None)]
    assert lines[-1]["object"] == {"id": RUNNING.id, "claim_id": "claim"}
    assert lines[0]["object"] == {"id": RUNNING.id, "claim_id": "claim"}


def test_an_exit_is_told_from_the_die_alone_and_not_again_after_the_inspect():
    die = {"Action": "die", "time": 105, "Actor": {"Attributes": {"exitCode": "3"}}}
    told = exit_line(RUNNING, [die])
    assert (told["action"], told["exit_code"], told["oom_killed"]) == ("exited", 3, False)
    assert (told["object"]["status"], told["object"]["exit_code"], told["object"]["finished"]) == ("exited", 3, 105)
    exited = replace(RUNNING, status="exited", finished=105, exit_code=3)
    assert container_changes(RUNNING, exited, [die], exit_told=True) == []
    again = replace(RUNNING, started=110, restart_count=1)
    assert actions(container_changes(RUNNING, again, [die, {"Action": "start"}], exit_told=True)) == [("restarted", None, None)]
    assert exit_line(replace(RUNNING, status="created"), [die]) is None, "a container never known running did not exit"
    assert exit_line(RUNNING, [{"Action": "start"}]) is None


def test_a_stream_ends_once_its_client_hangs_up(tmp_path):
    history = EventHistory(tmp_path, 10)
    server, client = socket.socketpair()
    with server:
        lines = stream_lines(history.reader(None), ChangeNotifier(history.folder), 60, threading.Event(), True, partial(hung_up, server))
        assert next(lines) == b"" and json.loads(next(lines))["kind"] == "heartbeat"
        assert not hung_up(server)
        client.close()
        assert list(lines) == [], "the stream ends without waiting for a heartbeat to fail"
    talking, talker = socket.socketpair()
    with talking, talker:
        talker.sendall(b"x")
        assert not hung_up(talking), "bytes from the client are not its end"


def test_a_stream_asked_to_end_ends_after_its_timeout_with_a_heartbeat_to_resume_from(tmp_path):
    history = EventHistory(tmp_path, 10)
    history.record([change(1)])
    started = time.monotonic()
    lines = stream_lines(history.reader(1), ChangeNotifier(history.folder), 60, threading.Event(), False, timeout=0.5)
    assert next(lines) == b""
    threading.Timer(0.2, history.record, ([change(2)],)).start()
    sent = [json.loads(line) for chunk in lines for line in chunk.splitlines()]
    assert 0.5 <= time.monotonic() - started < 1.5, "ends at its timeout, not at the next heartbeat (60 s)"
    assert [(line["revision"], line["kind"]) for line in sent] == [(2, "node"), (2, "heartbeat")]


def test_an_append_that_finds_no_room_is_taken_back_whole(tmp_path):
    """On a full filesystem a change that crosses into a block it cannot get fails as ENOSPC; the part
    that landed is taken back, the revision stays, and once there is room the next change follows."""
    with small_tmpfs(tmp_path / "state", size="1m") as state_dir:
        history = EventHistory(state_dir, 100)
        history.record([change(1)])
        reader = history.reader(0)
        before = (state_dir / "events" / "current.jsonl").read_bytes()
        room = fill(state_dir)
        big = {"kind": "node", "action": "drain", "object": {"padding": "x" * 20000}}
        with pytest.raises(OSError) as refused:
            history.record([change(2), big])
        assert refused.value.errno == errno.ENOSPC
        assert (state_dir / "events" / "current.jsonl").read_bytes() == before
        assert history.revision() == 1
        assert revisions(reader.read()) == [1]
        room.unlink()
        assert history.record([change(3)]) == 2
        assert revisions(reader.read()) == [2]
        assert json.loads(history.reader(1).read()[0])["object"] == {"n": 3}


def test_a_reader_serves_no_line_before_its_revision_counts(tmp_path):
    """A line in the file whose revision the word does not show yet (its writer has not published,
    or is taking it back) is left for a later read."""
    history = EventHistory(tmp_path, 100)
    history.record([change(1)])
    reader = history.reader(0)
    with open(tmp_path / "events" / "current.jsonl", "ab") as file:
        file.write(b'{"revision": 2, "time": 0, "kind": "node", "action": "drain", "object": {}}\n')
    assert revisions(reader.read()) == [1]
    with history.locked():
        history.append_locked([])  # publishes what the files hold
    assert revisions(reader.read()) == [2]


def test_a_stream_that_read_a_change_before_its_commit_is_woken_by_the_commit(tmp_path, monkeypatch):
    """The lines go to the file first and count once the revision is committed: a stream woken by the
    append that reads before the commit finds nothing, and must be woken again by the commit itself."""
    history = EventHistory(tmp_path, 100)
    notifier = ChangeNotifier(history.folder)
    reader = history.reader(None)
    woken_at_read: list[int] = []
    commit = history._publish

    def read_before_the_commit(revision: int) -> None:
        deadline, last = time.monotonic() + 5, -1
        while (notifier.count == 0 or notifier.count != last) and time.monotonic() < deadline:  # the append's own wake-ups, all in
            last = notifier.count
            time.sleep(0.05)
        woken_at_read.append(notifier.count)
        assert reader.read() == [], "appended, not committed"
        commit(revision)

    monkeypatch.setattr(history, "_publish", read_before_the_commit)
    history.record([{"kind": "node", "action": "drained", "object": {}}])
    seen = woken_at_read[0]
    notifier.wait(seen, 5.0)
    assert notifier.count > seen, "the commit woke no stream: it would sleep until its next look"
    assert [json.loads(line)["action"] for line in reader.read()] == ["drained"]
