"""The node-wide view: one watcher per node, shared by every worker, exact, and cheap to restart.

The agent runs against the real engine through a relay that counts its API calls, so a test
can say how many inspects a restart or a worker's death cost.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import threading
import time

import pytest
import requests

from tests.support.polling import wait_for
from tests.support.relay import EVENTS, INSPECT
from utopia_agent.config import Config
from utopia_agent.engine import node_view
from utopia_agent.engine.manager import DockerManager
from utopia_agent.claims.records import CLAIM_LABEL, MANAGED_LABEL, ContainerSpec, ContainerState
from utopia_agent.engine.node_view import HEARTBEAT_SECONDS, TRUST_SECONDS, Snapshot

WATCHING = re.compile(r"watching the engine's events for the node view \(pid (\d+)")


@pytest.fixture
def view_manager(engine, tmp_path):
    """DockerManagers in this process that volunteer to watch, on one state dir; closed after the test."""
    made = []

    def make() -> DockerManager:
        manager = DockerManager(Config(token="-", state_dir=tmp_path, engine_timeout=10, network_isolation=False))
        manager.view.volunteer()
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture
def held_back(monkeypatch):
    """While cleared, the view's watcher holds the engine's events before applying them, as on a
    busy node, and the view stays trusted (a lagging view, not a dead one); set again, it goes on."""
    flowing = threading.Event()
    flowing.set()
    apply = node_view._Watcher._apply

    def apply_when_flowing(watcher, events):
        flowing.wait(30)
        apply(watcher, events)

    monkeypatch.setattr(node_view._Watcher, "_apply", apply_when_flowing)
    monkeypatch.setattr(node_view, "TRUST_NS", 30 * 10**9)
    yield flowing
    flowing.set()


def watchers(agent) -> list[int]:
    return [int(pid) for pid in WATCHING.findall(agent.log())]


def inspected_ids(calls: list[str]) -> set[str]:
    return {call.split("/containers/")[1].split("/")[0] for call in calls}


def start_managed(docker_client, image: str, claim_id: str, command: list[str], **host_config) -> str:
    """A managed container made and started with the engine's own calls, behind the agent's back."""
    labels = {"utopia.managed": "true", "utopia.claim_id": claim_id}
    created = docker_client.api.create_container(
        image, command, name=f"utopia-{claim_id}", labels=labels, host_config=docker_client.api.create_host_config(**host_config)
    )
    docker_client.api.start(created["Id"])
    return created["Id"]


def shown_by(manager: DockerManager, container_id: str) -> ContainerState | None:
    snapshot = manager.view.snapshot()
    return snapshot.get(container_id) if snapshot else None


def test_one_watcher_serves_every_worker_and_a_create_shows_at_once_on_the_others(agent_factory, relay, test_image, claim):
    agent = agent_factory(workers=2, DOCKER_HOST=relay.base_url)
    sessions = agent.sessions()
    for suffix in "abc":
        created = agent.create(claim(suffix), test_image, command=["sleep", "300"])
        assert created.status_code == 201, created.text
        container_id = created.json()["container_id"]
        for session in sessions:
            listed = {c["id"]: c for c in session.get(agent.base_url + "/api/v1/containers").json()}
            assert listed[container_id]["status"] == "running" and listed[container_id]["started"] > 0
    assert len(watchers(agent)) == 1, agent.log()[-2000:]
    assert len(relay.calls(EVENTS)) == 1, "one event stream for the node, not one per worker"


def test_probes_take_the_watchers_heartbeat_for_the_engine_answering(agent_factory, relay):
    """/health on every worker trusts the one watcher's heartbeat: no worker pings the engine itself."""
    agent = agent_factory(workers=4, DOCKER_HOST=relay.base_url)
    # Counted once the view is live: until then a worker's probe asks the engine itself, as it must.
    assert wait_for(lambda: len(watchers(agent)) == 1 and "node view live" in agent.log(), timeout=10), agent.log()[-2000:]
    pings_before, started = relay.count(r"/_ping$"), time.monotonic()
    while time.monotonic() - started < 3 * TRUST_SECONDS:
        assert requests.get(agent.base_url + "/health", timeout=10).status_code == 200  # a new connection: any worker
        time.sleep(0.02)
    heartbeats = (time.monotonic() - started) / HEARTBEAT_SECONDS
    assert relay.count(r"/_ping$") - pings_before <= heartbeats + 2, "only the watcher's heartbeat pings"


def test_a_restarted_agent_and_a_new_watcher_inspect_only_what_changed(agent_factory, relay, docker_client, test_image, claim):
    agent = agent_factory(workers=2, DOCKER_HOST=relay.base_url)
    ids = [start_managed(docker_client, test_image, claim(str(i)), ["sleep", "300"]) for i in range(6)]

    def listed() -> dict[str, tuple[str, int]]:
        """Over a fresh connection, so any live worker answers (a killed one's connection would fail)."""
        rows = requests.get(agent.base_url + "/api/v1/containers", headers={"Authorization": f"Bearer {agent.token}", "Connection": "close"}, timeout=60).json()
        return {c["id"]: (c["status"], c["started"]) for c in rows if c["id"] in ids}

    def engine_view() -> dict[str, tuple[str, int]]:
        return {i: (s.status, s.started) for i in ids if (s := ContainerState.from_inspect(docker_client.api.inspect_container(i)))}

    assert wait_for(lambda: listed() == engine_view(), timeout=5, interval=0.05)
    agent.stop()
    changed = ids[0]
    docker_client.api.restart(changed, timeout=0)
    calls_before = len(relay.calls(INSPECT))

    agent.start()
    for session in agent.sessions():
        rows = {c["id"]: (c["status"], c["started"]) for c in session.get(agent.base_url + "/api/v1/containers").json() if c["id"] in ids}
        assert rows == engine_view()
    assert inspected_ids(relay.calls(INSPECT)[calls_before:]) <= {changed}, "the restarted agent inspected containers nothing changed"

    watcher = watchers(agent)[-1]
    calls_before = len(relay.calls(INSPECT))
    os.kill(watcher, signal.SIGKILL)
    assert wait_for(lambda: listed() == engine_view() and watchers(agent)[-1] != watcher, timeout=15, interval=0.1), agent.log()[-2000:]
    assert relay.calls(INSPECT)[calls_before:] == [], "the worker that took over the watch inspected containers nothing changed"


def test_the_view_holds_what_an_inspect_gives(view_manager, docker_client, test_image, claim):
    manager = view_manager()
    container_id = start_managed(
        docker_client, test_image, claim(), ["sh", "-c", "sleep 0.2; exit 3"], restart_policy={"Name": "on-failure", "MaximumRetryCount": 1}
    )
    assert wait_for(lambda: (c := shown_by(manager, container_id)) and c.status == "exited" and c.restart_count == 1, timeout=15, interval=0.05)
    state = shown_by(manager, container_id)
    assert state == ContainerState.from_inspect(docker_client.api.inspect_container(container_id))
    assert (state.exit_code, state.oom_killed, state.error) == (3, False, "")
    assert state.finished >= state.started >= state.created > 0
    assert state.labels["utopia.claim_id"] == claim() and state.name == f"utopia-{claim()}"


def test_reads_give_the_same_objects_while_the_view_does_not_change(view_manager, docker_client, test_image, claim):
    """Routes keep the JSON of what they were given while it is the very same object: the list is one
    tuple per view, and a container nothing changed is one object, listed or shown."""
    manager = view_manager()
    first = start_managed(docker_client, test_image, claim("a"), ["sleep", "300"])
    assert wait_for(lambda: (c := shown_by(manager, first)) and c.status == "running", timeout=10, interval=0.05)
    listed = manager.list_managed()
    assert manager.list_managed() is listed
    [kept] = [c for c in listed if c.id == first]
    assert manager.get_managed(first) is kept and manager.get_managed(first[:12]) is kept

    second = start_managed(docker_client, test_image, claim("b"), ["sleep", "300"])
    assert wait_for(lambda: (c := shown_by(manager, second)) and c.status == "running", timeout=10, interval=0.05)
    relisted = manager.list_managed()
    assert relisted is not listed and {first, second} <= {c.id for c in relisted}
    assert manager.get_managed(first) is kept, "a record the change did not touch is the same object"
    assert manager.get_managed(second).claim_id == claim("b")


def test_a_new_watcher_replays_the_events_it_missed(view_manager, docker_client, test_image, claim):
    """A container that ran and stopped again while no one watched looks the same in a list call
    (exited, no network endpoint); only the events since the view's last one tell the new exit code."""
    first = view_manager()
    script = "test -f /ran && exit 4; touch /ran; exit 3"
    container_id = start_managed(docker_client, test_image, claim(), ["sh", "-c", script])
    assert wait_for(lambda: (c := shown_by(first, container_id)) and c.status == "exited", timeout=10, interval=0.05)
    assert shown_by(first, container_id).exit_code == 3
    first.close()

    docker_client.api.start(container_id)
    assert docker_client.api.wait(container_id, timeout=30)["StatusCode"] == 4
    second = view_manager()
    assert wait_for(lambda: (c := shown_by(second, container_id)) and c.exit_code == 4, timeout=10, interval=0.05), shown_by(second, container_id)


def test_a_frozen_watcher_sends_reads_to_the_engine_until_it_thaws(agent_factory, docker_client, test_image, claim):
    """The view is trusted only while its watcher vouches for it: a stopped watcher stops vouching,
    the other worker reads the engine (exact, if slower), and the view comes back by itself."""
    agent = agent_factory(workers=2)
    ids = [start_managed(docker_client, test_image, claim(str(i)), ["sleep", "300"]) for i in range(2)]

    def listed() -> set[str]:
        rows = requests.get(agent.base_url + "/api/v1/containers", headers={"Authorization": f"Bearer {agent.token}", "Connection": "close"}, timeout=60).json()
        return {c["id"] for c in rows if c["id"] in ids}

    assert wait_for(lambda: listed() == set(ids), timeout=5, interval=0.05)
    [watcher] = watchers(agent)
    os.kill(watcher, signal.SIGSTOP)
    try:
        time.sleep(TRUST_SECONDS)
        docker_client.api.remove_container(ids[0], force=True)
        assert listed() == {ids[1]}, "a frozen watcher's view was served"
    finally:
        os.kill(watcher, signal.SIGCONT)
    assert wait_for(lambda: {c.id for c in Snapshot.read(agent.state_dir / "view.jsonl").containers} & set(ids) == {ids[1]}, timeout=5, interval=0.05)
    assert listed() == {ids[1]}


def test_a_batch_of_events_slower_than_the_trust_keeps_the_view_trusted(two_workers, relay, docker_client, test_image, claim):
    """While the engine starts containers, an inspect of each waits for its start: one batch of
    events can take the watcher longer than the trust. The engine answers all along, so each
    answer vouches, and readers stay on the view (listing the engine instead would wait on the
    same starts, for every container)."""
    worker = two_workers
    relay.delay(r"/containers/[0-9a-f]+/json$", 0.8 * TRUST_SECONDS / 2, "GET")
    lapses, sampling = [], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            if worker.view.snapshot() is None:
                lapses.append(time.monotonic())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ids = [docker_client.api.create_container(test_image, ["sleep", "300"], name=f"utopia-{claim(str(i))}",
                                                  labels={MANAGED_LABEL: "true", CLAIM_LABEL: claim(str(i))})["Id"]
               for i in range(6)]
        assert wait_for(lambda: all(shown_by(worker, cid) for cid in ids), timeout=30, interval=0.05)
    finally:
        sampling.set()
        sampler.join()
    assert len(relay.calls(INSPECT)) >= len(ids)
    assert lapses == [], f"the view lapsed for {lapses[-1] - lapses[0]:.2f} s while the engine answered"


def test_an_inspect_the_engine_never_answers_lets_the_trust_lapse(two_workers, relay, docker_client, test_image, claim):
    """Events alone do not vouch: a watcher stuck on an inspect stops vouching, and readers go to the engine."""
    worker = two_workers
    relay.hang(r"/containers/[0-9a-f]+/json$", "GET")
    docker_client.api.create_container(test_image, ["sleep", "300"], name=f"utopia-{claim()}", labels={MANAGED_LABEL: "true", CLAIM_LABEL: claim()})
    assert wait_for(lambda: worker.view.snapshot() is None, timeout=TRUST_SECONDS + 3 * HEARTBEAT_SECONDS, interval=0.05)
    relay.clear()
    assert wait_for(lambda: worker.view.snapshot() is not None, timeout=10, interval=0.05)


def test_a_snapshot_round_trips_and_keeps_the_records_that_did_not_change(tmp_path):
    """The view file is read a line at a time: unchanged lines give the very same records."""
    def state(n: int, status: str = "running") -> ContainerState:
        return ContainerState(id=f"{n:02x}" * 32, name=f"utopia-c{n}", image="i", status=status, created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels={"utopia.claim_id": f'c"{n}'})
    path = tmp_path / "view.jsonl"
    Snapshot.of(1, 7, (state(1), state(2))).write(path)
    first = Snapshot.read(path)
    assert (first.generation, first.event_ns, first.containers) == (1, 7, (state(1), state(2)))
    assert first.get(state(2).id) == state(2) and first.labelled("utopia.claim_id", 'c"1') == [state(1)]

    Snapshot.of(2, 9, (state(1), state(2, "exited"))).write(path)
    second = Snapshot.read(path, previous=first)
    assert second.get(state(2).id).status == "exited"
    assert second.containers[0] is first.containers[0] and second.containers[1] == state(2, "exited")

    # Shown one at a time, never listed: a record is parsed once, and an unchanged one carries over.
    Snapshot.of(3, 11, (state(1), state(2, "exited"), state(3))).write(path)
    third = Snapshot.read(path, previous=Snapshot.read(path, previous=second))
    shown = third.get(state(1).id)
    assert third.get(state(1).id) is shown and third.with_prefix(state(3).id[:12]) == [state(3)]
    Snapshot.of(4, 13, (state(1), state(3, "exited"))).write(path)
    fourth = Snapshot.read(path, previous=third)
    assert fourth.get(state(1).id) is shown and fourth.get(state(2).id) is None and fourth.get(state(3).id).status == "exited"


def test_showing_one_container_finds_its_line_without_indexing_the_view(tmp_path):
    """Right after a change a reader shows one container: its line is found in the file's bytes, the
    other lines are neither split out nor parsed; prefixes and labels are found the same way."""
    def state(n: int, claim: str) -> ContainerState:
        return ContainerState(id=f"ab{n:02x}" * 16, name=f"utopia-c{n}", image="i", status="running", created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels={"utopia.claim_id": claim})
    path = tmp_path / "view.jsonl"
    states = (state(1, "a"), state(2, "b"), state(3, "b"))
    Snapshot.of(1, 7, states).write(path)
    snapshot = Snapshot.read(path)
    assert snapshot.get(states[1].id) == states[1] and snapshot.get("ab" * 32) is None
    assert snapshot.with_prefix(states[2].id[:12]) == [states[2]]
    assert snapshot.with_prefix("abab") == [] and len(snapshot.with_prefix("ab0")) == 3  # the caller refuses an ambiguous prefix
    assert snapshot.labelled("utopia.claim_id", "b") == [states[1], states[2]] and snapshot.labelled("utopia.claim_id", "c") == []
    assert "_lines" not in snapshot.__dict__, "showing built the index of every line"
    assert snapshot.containers == states and snapshot.get(states[1].id) is snapshot.containers[1]

    # A view written before its header counted the containers reads the same.
    header, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(json.dumps({k: v for k, v in json.loads(header).items() if k != "containers"}).encode() + b"\n" + body)
    assert Snapshot.read(path).containers == states


def test_a_label_named_id_cannot_stand_in_for_another_container(tmp_path):
    """Image labels are the tenant's, and the engine copies them onto the container: one named `id`
    whose value is another container's id is written as `{"id": "<that id>` inside the tenant's own
    line. Showing, finding by prefix and listing still give each container its own record."""
    def state(n: int, labels: dict[str, str]) -> ContainerState:
        return ContainerState(id=f"cd{n:02x}" * 16, name=f"utopia-c{n}", image="i", status="running", created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels=labels)
    victim = state(1, {"utopia.claim_id": "victim"})
    hostile = state(2, {"id": victim.id, "utopia.claim_id": "hostile"})
    shorter = state(3, {"id": victim.id[:20] + '", "status": "exited', "utopia.claim_id": "third"})
    path = tmp_path / "view.jsonl"
    Snapshot.of(1, 7, (hostile, shorter, victim)).write(path)
    assert f'{{"id": "{victim.id}"'.encode() in path.read_bytes().split(b"\n")[1], "the label is written as the test means"
    for read in (lambda: Snapshot.read(path), lambda: Snapshot.of(1, 7, (hostile, shorter, victim))):
        snapshot = read()
        assert snapshot.get(victim.id) == victim and snapshot.with_prefix(victim.id[:12]) == [victim]
        assert snapshot.labelled("utopia.claim_id", "victim") == [victim] and snapshot.containers == (hostile, shorter, victim)


def test_a_snapshot_encodes_only_the_records_that_changed_since_the_previous_one(tmp_path):
    """The watcher rewrites the view at every change: an unchanged record keeps its encoded line."""
    def state(n: int, status: str = "running") -> ContainerState:
        return ContainerState(id=f"{n:02x}" * 32, name=f"utopia-c{n}", image="i", status=status, created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels={})
    kept, changed = state(1), state(2)
    first = Snapshot.of(1, 7, (kept, changed))
    second = Snapshot.of(2, 9, (kept, state(2, "exited"), state(3)), previous=first)
    assert second._lines[kept.id] is first._lines[kept.id]
    assert second._lines[changed.id] != first._lines[changed.id]
    path = tmp_path / "view.jsonl"
    second.write(path)
    assert Snapshot.read(path).containers == (kept, state(2, "exited"), state(3))
    # An equal record that is another object is encoded again, and reads back the same.
    third = Snapshot.of(3, 11, (state(1),), previous=second)
    third.write(path)
    assert Snapshot.read(path).containers == (state(1),)


def test_records_only_shown_do_not_pile_up_across_snapshots(tmp_path):
    """A reader shown many containers that have since gone keeps at most about the current view's worth."""
    def state(n: int) -> ContainerState:
        return ContainerState(id=f"{n:02x}" * 32, name=f"utopia-c{n}", image="i", status="running", created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels={})
    path = tmp_path / "view.jsonl"
    Snapshot.of(1, 1, tuple(state(n) for n in range(1, 11))).write(path)
    many = Snapshot.read(path)
    assert all(many.get(state(n).id) == state(n) for n in range(1, 11))
    Snapshot.of(2, 2, (state(1), state(11))).write(path)
    few = Snapshot.read(path, previous=many)
    assert len(few._parsed()) <= 2, "the records of the ten gone or changed lines are dropped"
    assert few.get(state(1).id) is many.get(state(1).id) and few.get(state(11).id) == state(11)


def test_records_kept_for_reuse_are_bounded_and_reused_while_unchanged(tmp_path, monkeypatch):
    """A worker keeps one ManagedContainer per container while its record stays the same (routes
    keep their JSON by it), and drops them all at once past the bound, so gone containers do not
    pile up; the bound of the rendered bodies works the same way."""
    from flask import Flask

    from utopia_agent.engine import manager as docker_manager
    from utopia_agent.api.operations import RenderedWhileSame
    from utopia_agent.schemas import ContainerSchema

    def state(n: int, status: str = "running") -> ContainerState:
        return ContainerState(id=f"{n:02x}" * 32, name=f"utopia-c{n}", image="i", status=status, created=n, started=n, finished=0,
                              exit_code=0, oom_killed=False, restart_count=0, error="", labels={"utopia.claim_id": f"c{n}"})

    monkeypatch.setattr(docker_manager, "MAX_RECORDS_KEPT", 3)
    manager = docker_manager.DockerManager(Config(token="t" * 32, state_dir=tmp_path))
    try:
        first = manager._record(state(1))
        assert manager._record(state(1)) is first, "an equal record is the same object"
        assert manager._record(state(1, "exited")) is not first
        for n in range(2, 8):
            manager._record(state(n))
            assert len(manager._records) <= 3
    finally:
        manager.close()

    rendered = RenderedWhileSame(ContainerSchema())
    monkeypatch.setattr(rendered, "MAX_KEPT", 3)
    with Flask("t").app_context():
        for n in range(1, 8):
            rendered.response(first, key=n)
            assert len(rendered._rendered) <= 3


# --- allocation decides on the view once it shows every change made under the lock --------

def test_metrics_read_the_gpu_holders_with_one_list_while_the_view_is_not_trusted(agent_factory, relay, test_image, claim):
    """Where the view is not trusted (its watcher frozen here; on a busy node, held up by a slow inspect in a burst of
    creates), the metrics need only who holds which GPU: one list call of the holders, not an inspect of every container."""
    agent = agent_factory(workers=2, DOCKER_HOST=relay.base_url)
    held = agent.create(claim("gpu"), test_image, command=["sleep", "300"], gpu_count=1)
    assert held.status_code == 201, held.text
    for n in range(2):
        assert agent.create(claim(str(n)), test_image, command=["sleep", "300"], gpu_count=0).status_code == 201

    def metrics() -> dict:
        answer = requests.get(agent.base_url + "/api/v1/metrics", headers={"Authorization": f"Bearer {agent.token}", "Connection": "close"}, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def without_inspects() -> dict | None:
        """The metrics, when no inspect came meanwhile (a background job of the other worker, the claim
        usage sampler say, may list and inspect while the view is not trusted: a metrics call that
        inspected would every time)."""
        inspects, lists = len(relay.calls(INSPECT)), relay.count(LIST_CALL, "GET")
        answer = metrics()
        assert relay.count(LIST_CALL, "GET") > lists, "the view is trusted: the engine was not asked"
        return answer if relay.calls(INSPECT)[inspects:] == [] else None

    trusted = metrics()
    [watcher] = watchers(agent)
    os.kill(watcher, signal.SIGSTOP)
    try:
        time.sleep(TRUST_SECONDS)
        untrusted = next(filter(None, (without_inspects() for _ in range(3))), None)
    finally:
        os.kill(watcher, signal.SIGCONT)
    assert untrusted is not None, "the metrics inspected containers"
    assert [gpu["busy"] for gpu in untrusted["gpus"]] == [gpu["busy"] for gpu in trusted["gpus"]], "the same GPU held, read from the engine"


LIST_CALL = r"/containers/json$"


def sleeper(claim_id: str, image: str) -> ContainerSpec:
    return ContainerSpec(claim_id=claim_id, image=image, command=("sleep", "300"), cpus=0.01, memory_mb=32)


def held_by_claim(manager: DockerManager, claim_id: str) -> list:
    return manager.holders_now()[0](f"{CLAIM_LABEL}={claim_id}")


def decides_on_the_view(manager: DockerManager, relay) -> bool:
    lists = relay.count(LIST_CALL, "GET")
    _, from_view = manager.holders_now()
    assert from_view == (relay.count(LIST_CALL, "GET") == lists)
    return from_view


@pytest.fixture
def two_workers(view_manager, relay, monkeypatch):
    """The watcher and another worker on one state dir, both through the relay (which counts lists)."""
    monkeypatch.setenv("DOCKER_HOST", relay.base_url)
    view_manager()  # the watcher; the next one reads what it publishes, as another worker
    worker = view_manager()
    assert wait_for(lambda: worker.view.snapshot_for_allocation() is not None, timeout=10, interval=0.05)
    return worker


def test_a_create_the_view_may_not_show_yet_sends_the_next_decisions_to_the_engine(two_workers, held_back, relay, test_image, claim):
    worker = two_workers
    held_back.clear()
    container_id = worker.create(sleeper(claim("a"), test_image))
    snapshot = worker.view.snapshot()
    assert snapshot is not None and snapshot.get(container_id) is None, "the view should be trusted and behind"
    for _ in range(2):  # a list tells the holder that lists, and no one after it
        assert [held.container_id for held in held_by_claim(worker, claim("a"))] == [container_id]
        assert not decides_on_the_view(worker, relay)

    held_back.set()
    worker.start(container_id)
    assert shown_by(worker, container_id).status == "running"
    assert decides_on_the_view(worker, relay), "once the creator's wait sees it, the view holds every change made under the lock"
    assert {held.container_id for held in held_by_claim(worker, claim("a"))} == {container_id}


def test_a_start_after_a_stop_holds_its_claim_again_before_the_view_shows_it(two_workers, held_back, relay, test_image, claim):
    """A stopped claim holds nothing; started again it holds what it was made with from its rename
    on: a view that still shows the stop mark must not give that away."""
    worker = two_workers
    container_id = worker.create(sleeper(claim(), test_image))
    worker.start(container_id)
    mark = worker.mark_stopped(worker.get_managed(container_id), "requested")
    worker.stop(container_id, grace_seconds=0)
    [stopped] = held_by_claim(worker, claim())
    assert stopped.stopped and stopped.cpus == 0

    held_back.clear()
    worker.unmark_stopped(worker.get_managed(container_id), mark)
    assert shown_by(worker, container_id).name != f"utopia-{claim()}", "the view should still show the stop mark"
    [taken_back] = held_by_claim(worker, claim())
    assert not taken_back.stopped and taken_back.cpus == 0.01
    held_back.set()


def test_an_earlier_changes_wait_does_not_vouch_for_a_later_one(two_workers, held_back, relay, test_image, claim):
    """The view showing the first of two creates says nothing of the second: decisions list the
    engine until the second's wait sees it."""
    worker = two_workers
    first = worker.create(sleeper(claim("a"), test_image))
    held_back.clear()
    second = worker.create(sleeper(claim("b"), test_image))
    held_back.set()
    worker.start(first)
    assert not decides_on_the_view(worker, relay)
    assert second in {held.container_id for held in worker.holders_now()[0](MANAGED_LABEL)}
    worker.start(second)
    assert decides_on_the_view(worker, relay)


def test_a_change_no_wait_sees_is_settled_by_the_watchers_next_list(two_workers, relay, test_image, claim):
    """A create whose worker died before its start (its wait never comes): the watcher's next
    list of the engine shows it, and decisions go back to the view."""
    worker = two_workers
    worker.create(sleeper(claim(), test_image))
    assert not decides_on_the_view(worker, relay)
    worker.view.request_resync()
    assert wait_for(lambda: decides_on_the_view(worker, relay), timeout=10, interval=0.05)


# --- the header's words, with a watcher standing in (another worker's lock and words), no engine --


@pytest.fixture
def watched(tmp_path):
    """A NodeView on a state dir whose watcher is another worker: the lock held elsewhere, a live
    view published with its words. Yields (view, header) and lets the lock go after."""
    from utopia_agent.events.history import EventHistory
    Snapshot.of(1, 0, ()).write(tmp_path / "view.jsonl")
    lock_fd = os.open(tmp_path / "view.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    view = node_view.NodeView(tmp_path, engine=None, wait_seconds=1.0, history=EventHistory(tmp_path, 10))
    header = node_view._Header(tmp_path / "view.state")
    header.set(header.GENERATION, 1)
    header.set(header.STATE, node_view.LIVE)
    header.set(header.DEADLINE, time.monotonic_ns() + 10**9)
    yield view, header
    view.close()
    header.close()
    os.close(lock_fd)


def test_a_deadline_from_before_a_reboot_is_not_trusted(watched):
    """The header outlives a reboot, and the monotonic clock starts again at boot: a deadline
    further ahead than any watcher sets is from before it, and the view is read from the engine."""
    view, header = watched
    assert view.snapshot() is not None
    header.set(header.DEADLINE, time.monotonic_ns() + 3600 * 10**9)
    assert view.snapshot() is None and view.snapshot_for_allocation() is None


def test_only_the_latest_changes_own_wait_lets_allocation_back_on_the_view(watched):
    view, header = watched
    assert view.snapshot_for_allocation() is not None
    view.changed_under_lock("first")
    view.changed_under_lock("second")
    view._acknowledge("first", shown=True)
    assert view.snapshot_for_allocation() is None, "an earlier change's wait vouched for a later one"
    view._acknowledge("second", shown=False)
    view._acknowledge("second", shown=True)
    assert view.snapshot_for_allocation() is None, "a wait that failed left its token for a later wait"
    view.changed_under_lock("third")
    view._acknowledge("third", shown=True)
    assert view.snapshot_for_allocation() is not None
