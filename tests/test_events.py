"""The event stream (the contract's "Events") and exact idempotent creates, on a real engine and gunicorn."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.support.polling import wait_for
from tests.test_gpu_health import script
from utopia_agent.client import ClaimExists
from utopia_agent.schemas import MAX_EVENTS_TIMEOUT_SECONDS

pytestmark = pytest.mark.usefixtures("nvidia_path")


class Watch:
    """One open stream, read on a thread; `lines` grows as they come."""

    def __init__(self, agent, since=None):
        params = {"since": since} if since is not None else {}
        self.response = agent.get("/api/v1/events", params=params, stream=True, timeout=(10, None))
        assert self.response.status_code == 200, self.response.text
        assert self.response.headers["Content-Type"].startswith("application/x-ndjson")
        self.lines: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for raw in self.response.iter_lines():
                if raw:
                    self.lines.append(json.loads(raw))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, AttributeError):
            pass

    def changes(self, kind=None):
        return [line for line in list(self.lines) if line["kind"] != "heartbeat" and (kind is None or line["kind"] == kind)]

    def wait(self, predicate, timeout=60):
        assert wait_for(lambda: predicate(self.changes()), timeout=timeout, interval=0.05), self.changes()
        return self.changes()

    def close(self):
        self.response.close()


def of_container(changes, container_id):
    return [(c["action"], c.get("exit_code"), c.get("oom_killed")) for c in changes if c["kind"] == "container" and c["object"]["id"] == container_id]


def revisions_grow(changes):
    revisions = [c["revision"] for c in changes]
    return revisions == sorted(set(revisions))


@pytest.fixture
def events_agent(agent_factory, test_image):
    return agent_factory(workers=3, UTOPIA_AGENT_EVENTS_HEARTBEAT_SECONDS="1")


def test_a_claims_life_on_the_stream(events_agent, docker_client, test_image, claim):
    agent = events_agent
    watch = Watch(agent)
    try:
        first = watch.lines and watch.lines[0]
        assert wait_for(lambda: watch.lines, timeout=10) and watch.lines[0]["kind"] == "heartbeat", "a stream starts with the current revision"
        exits = agent.create(claim("exit"), test_image, restart_policy="no", command=["sh", "-c", "sleep 0.5; exit 3"])
        assert exits.status_code == 201, exits.text
        exits_id = exits.json()["container_id"]
        watch.wait(lambda c: ("exited", 3, False) in of_container(c, exits_id))
        oom = agent.create(claim("oom"), test_image, memory_mb=64, restart_policy="no", command=["sh", "-c", "x=$(yes | head -c 200000000)"])
        assert oom.status_code == 201, oom.text
        oom_id = oom.json()["container_id"]
        watch.wait(lambda c: any(a == "exited" and killed for a, _, killed in of_container(c, oom_id)))
        assert agent.delete(f"/api/v1/containers/{exits_id}").status_code == 204
        changes = watch.wait(lambda c: ("removed", None, None) in of_container(c, exits_id))
        assert [a for a, _, _ in of_container(changes, exits_id)] == ["created", "started", "exited", "removed"]
        assert ("exited", 137, True) in of_container(changes, oom_id)
        assert revisions_grow(changes) and changes[0]["revision"] > watch.lines[0]["revision"]
        created = next(c for c in changes if c["action"] == "created")
        assert created["object"]["claim_id"] == claim("exit") and created["object"]["labels"]["utopia.spec_digest"]
        removed = next(c for c in changes if c["action"] == "removed")
        assert removed["object"] == {"id": exits_id, "claim_id": claim("exit")}
    finally:
        watch.close()
    del first


def test_a_restart_by_the_engines_policy_is_an_exit_then_a_restart(events_agent, test_image, claim):
    agent = events_agent
    watch = Watch(agent)
    try:
        answer = agent.create(claim(), test_image, restart_policy="on-failure", command=["sh", "-c", "sleep 1; exit 1"])
        assert answer.status_code == 201, answer.text
        container_id = answer.json()["container_id"]
        changes = watch.wait(lambda c: ("restarted", None, None) in of_container(c, container_id))
        assert of_container(changes, container_id)[:4] == [("created", None, None), ("started", None, None), ("exited", 1, False), ("restarted", None, None)]
        restarted = next(c for c in changes if c["action"] == "restarted")
        assert restarted["object"]["restart_count"] >= 1 and restarted["object"]["status"] == "running"
    finally:
        watch.close()


def test_a_resume_gets_exactly_what_it_missed_once_in_order(events_agent, test_image, claim):
    agent = events_agent
    listed = agent.get("/api/v1/containers")
    since = int(listed.headers["X-Utopia-Revision"])
    made = []
    for name in ("a", "b", "c"):
        answer = agent.create(claim(name), test_image, command=["sleep", "300"])
        assert answer.status_code == 201, answer.text
        made.append(answer.json()["container_id"])
    watch = Watch(agent, since=since)
    try:
        changes = watch.wait(lambda c: sum(1 for x in c if x["action"] == "started") >= 3)
        assert [c["revision"] for c in changes] == list(range(since + 1, since + 1 + len(changes))), "each once, in order, none skipped"
        assert [(c["action"], c["object"]["id"]) for c in changes] == [(a, cid) for cid in made for a in ("created", "started")]
    finally:
        watch.close()


def test_since_and_timeout_are_checked(events_agent):
    last = int(events_agent.get("/api/v1/gpus").headers["X-Utopia-Revision"])
    for bad in ({"since": "-1"}, {"since": "x"}, {"since": str(last + 5)},
                {"timeout": "0"}, {"timeout": "-3"}, {"timeout": "1.5"}, {"timeout": "x"}, {"timeout": str(MAX_EVENTS_TIMEOUT_SECONDS + 1)}):
        answer = events_agent.get("/api/v1/events", params=bad)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request", (bad, answer.text)
        assert set(answer.json()["errors"]) == set(bad), answer.text


def test_a_stream_asked_to_end_ends_with_a_heartbeat_to_resume_from(events_agent, test_image, claim):
    """`?timeout=S`: the whole answer, then a clean end (no reset, no half chunk) after S seconds; its last
    line is a heartbeat whose revision a watch resumes from, missing nothing made meanwhile."""
    agent = events_agent
    since = int(agent.get("/api/v1/gpus").headers["X-Utopia-Revision"])
    started = time.monotonic()
    timer = threading.Timer(0.5, agent.create, (claim(), test_image), {"command": ["sleep", "300"]})
    timer.start()
    answer = agent.get("/api/v1/events", params={"since": since, "timeout": 3}, timeout=30)  # read to its end
    timer.join()
    assert answer.status_code == 200 and 3 <= time.monotonic() - started < 10
    lines = [json.loads(line) for line in answer.text.splitlines()]
    last = lines[-1]
    assert last["kind"] == "heartbeat" and last["revision"] == max(line["revision"] for line in lines) > since
    assert ("created", "started") == tuple(line["action"] for line in lines if line["kind"] == "container")[:2]
    resumed = agent.get("/api/v1/events", params={"since": last["revision"], "timeout": 1}, timeout=30)
    assert [json.loads(line)["kind"] for line in resumed.text.splitlines()] == ["heartbeat"]

    with agent.new_client() as client:
        began = time.monotonic()
        watched = list(client.watch(since=since, timeout=2))
    assert 2 <= time.monotonic() - began < 8, "the client's watch ends with the agent's stream"
    assert [change["revision"] for change in watched] == [line["revision"] for line in lines if line["kind"] != "heartbeat"]


def test_a_history_smaller_than_the_changes_gives_410(agent_factory, test_image, claim):
    agent = agent_factory(workers=2, UTOPIA_AGENT_EVENTS_HISTORY="3")
    for name in ("a", "b", "c"):
        assert agent.create(claim(name), test_image, command=["sleep", "300"]).status_code == 201
    agent.post("/api/v1/node/drain", json={"reason": "maintenance"})
    agent.delete("/api/v1/node/drain")
    answer = agent.get("/api/v1/events", params={"since": 0})
    assert answer.status_code == 410 and answer.json()["error"] == "revision_too_old", answer.text
    last = answer.json()["revision"]
    watch = Watch(agent, since=last - 3)
    try:
        assert [c["revision"] for c in watch.wait(lambda c: len(c) >= 3)] == [last - 2, last - 1, last]
    finally:
        watch.close()
    with agent.new_client() as client:
        changes = client.watch(since=0)
        relist = next(changes)
        assert relist["kind"] == "relist" and {c.claim_id for c in relist["containers"]} == {claim(n) for n in ("a", "b", "c")}
        made = agent.create(claim("d"), test_image, command=["sleep", "300"]).json()["container_id"]
        after = next(change for change in changes if change["kind"] == "container")
        changes.close()
    assert (after["action"], after["object"]["id"]) == ("created", made), "after the relist, the changes from the list's revision on"


def test_gpu_quarantine_release_and_a_drain_appear(events_agent):
    agent = events_agent
    uuid = agent.get("/api/v1/gpus").json()[0]["uuid"]
    watch = Watch(agent)
    try:
        assert agent.post(f"/api/v1/gpus/{uuid}/quarantine", json={"reason": "test"}).status_code == 200
        assert agent.delete(f"/api/v1/gpus/{uuid}/quarantine").status_code == 200
        assert agent.post("/api/v1/node/drain", json={"reason": "kernel update"}).status_code == 200
        assert agent.delete("/api/v1/node/drain").status_code == 200
        # The stand-in's GPU 6 is lost from the start: its change may come too, whenever the monitor first looks.
        changes = [c for c in watch.wait(lambda c: len(c) >= 4) if c["kind"] == "node" or c["object"]["uuid"] == uuid]
        assert [(c["kind"], c["action"]) for c in changes] == [("gpu", "quarantined"), ("gpu", "free"), ("node", "drain"), ("node", "resume")]
        assert changes[0]["object"]["uuid"] == uuid and changes[0]["object"]["reason"] == "test"
        assert changes[2]["object"]["reason"] == "kernel update"
    finally:
        watch.close()


def test_a_gpu_nvml_shows_dirty_or_lost_appears_and_again_once_it_is_back(events_agent):
    agent = events_agent
    uuids = {gpu["index"]: gpu["uuid"] for gpu in agent.get("/api/v1/gpus").json()}
    watch = Watch(agent)
    try:
        script(agent, gpu0={"compute_processes": 1}, gpu2={"lost": True})
        watch.wait(lambda c: {(x["object"]["uuid"], x["action"]) for x in c} >= {(uuids[0], "releasing"), (uuids[2], "lost")})
        script(agent)
        changes = [x for x in watch.wait(lambda c: sum(1 for x in c if x["action"] == "free") >= 2) if x["object"]["index"] in (0, 2)]
        assert {(x["object"]["index"], x["action"]) for x in changes} == {(0, "releasing"), (2, "lost"), (0, "free"), (2, "free")}
        assert next(x for x in changes if x["action"] == "releasing")["object"]["reason"] == "compute processes are running"
    finally:
        script(agent)
        watch.close()


def test_an_idle_stream_gets_heartbeats_and_many_streams_leave_health_fast(events_agent):
    agent = events_agent
    watches = [Watch(agent) for _ in range(16)]
    try:
        assert wait_for(lambda: sum(1 for line in watches[0].lines if line["kind"] == "heartbeat") >= 3, timeout=30)
        over = agent.get("/api/v1/events", timeout=10)
        assert over.status_code == 429 and over.json()["error"] == "too_many_streams" and over.headers["Retry-After"], over.text
        for _ in range(20):
            health = agent.get("/health", auth=False, timeout=5)
            assert health.status_code == 200, health.text
        assert agent.get("/api/v1/containers", timeout=5).status_code == 200
    finally:
        for watch in watches:
            watch.close()
    # A closed stream frees its slot (the worker looks each second whether its client hung up).
    assert wait_for(lambda: _opens(agent), timeout=30)


def _opens(agent) -> bool:
    answer = agent.get("/api/v1/events", stream=True, timeout=10)
    answer.close()
    return answer.status_code == 200


def test_workers_killed_mid_stream_lose_nothing_for_a_resume(events_agent, test_image, claim):
    agent = events_agent
    watch = Watch(agent)
    assert wait_for(lambda: watch.lines, timeout=10)
    for pid in agent.worker_pids():
        os.kill(pid, signal.SIGKILL)
    watch.close()
    seen = watch.lines[-1]["revision"]
    made = None
    deadline = time.monotonic() + 60
    while made is None and time.monotonic() < deadline:
        try:
            answer = agent.create(claim("meanwhile"), test_image, command=["sleep", "300"])
            made = answer.json()["container_id"] if answer.status_code == 201 else None
        except requests.RequestException:
            time.sleep(0.2)
    assert made, "the agent's new workers take creates"
    resumed = Watch(agent, since=seen)
    try:
        changes = resumed.wait(lambda c: ("started", None, None) in of_container(c, made))
        assert [c["revision"] for c in changes] == list(range(seen + 1, seen + 1 + len(changes)))
        assert [a for a, _, _ in of_container(changes, made)] == ["created", "started"]
    finally:
        resumed.close()


def test_revisions_grow_across_a_restart_and_a_resume_is_exact(agent_factory, test_image, claim):
    agent = agent_factory(workers=2)
    assert agent.create(claim("before"), test_image, command=["sleep", "300"]).status_code == 201
    before = int(agent.get("/api/v1/containers").headers["X-Utopia-Revision"])
    assert before >= 2
    open_stream = Watch(agent)
    assert agent.stop() == 0, "an open stream ends with its worker: the graceful stop does not wait for it (it would be killed)"
    open_stream.close()
    agent.start()
    answer = agent.create(claim("after"), test_image, command=["sleep", "300"])
    assert answer.status_code == 201, answer.text
    watch = Watch(agent, since=before)
    try:
        changes = watch.wait(lambda c: ("started", None, None) in of_container(c, answer.json()["container_id"]))
        assert [c["revision"] for c in changes] == list(range(before + 1, before + 1 + len(changes)))
        assert all(c["object"]["claim_id"] != claim("before") for c in changes), "nothing already seen comes again"
    finally:
        watch.close()


def test_list_then_watch_misses_nothing(events_agent, test_image, claim):
    agent = events_agent
    assert agent.create(claim("listed"), test_image, command=["sleep", "300"]).status_code == 201
    listed = agent.get("/api/v1/containers")
    known = {c["id"] for c in listed.json()}
    answer = agent.create(claim("later"), test_image, command=["sleep", "300"])
    watch = Watch(agent, since=int(listed.headers["X-Utopia-Revision"]))
    try:
        changes = watch.wait(lambda c: ("started", None, None) in of_container(c, answer.json()["container_id"]))
        assert not known & {c["object"]["id"] for c in changes}, "what the list showed does not come again"
    finally:
        watch.close()


def test_a_retried_create_with_another_command_is_told_it_is_not_the_same(events_agent, test_image, claim):
    agent = events_agent
    body = {"claim_id": claim(), "image": test_image, "command": ["sleep", "300"]}
    first = agent.post("/api/v1/containers", json=body)
    assert first.status_code == 201, first.text
    again = agent.post("/api/v1/containers", json=body)
    assert again.status_code == 409 and again.json()["same_spec"] is True, again.text
    other = agent.post("/api/v1/containers", json={**body, "command": ["sleep", "301"]})
    assert other.status_code == 409 and other.json()["same_spec"] is False, other.text
    with agent.new_client() as client:
        assert client.create(claim(), test_image, command=["sleep", "300"]).existing
        with pytest.raises(ClaimExists) as refused:
            client.create(claim(), test_image, command=["sleep", "301"])
        assert refused.value.same_spec is False


def test_the_client_watch_yields_changes(events_agent, test_image, claim):
    agent = events_agent
    with agent.new_client() as client:
        _, since = client.listing()
        answer = agent.create(claim(), test_image, command=["sleep", "300"])
        stream = client.watch(since=since)
        actions = [next(stream)["action"], next(stream)["action"]]
        stream.close()
    assert actions == ["created", "started"], answer.text
