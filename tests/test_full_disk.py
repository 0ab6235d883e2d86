"""The agent's own disk: a state dir filled to the last byte (no 500, deletes work, and once space
returns everything works again, without a restart and after one), and disk pressure."""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_nvml import DEFAULT_TEST_GPUS, fake_nvml_env, write_fake_nvml_config
from tests.support.agent import AgentProcess
from tests.support.engine import TEST_IMAGE, free_port
from tests.support.polling import wait_for
from tests.support.small_filesystem import fill, small_tmpfs

pytestmark = pytest.mark.usefixtures("nvidia_path")


@pytest.fixture
def small_state_dir(tmp_path, engine) -> Iterator[Path]:
    """A 24 MB tmpfs as the state dir, unmounted whatever happens."""
    with small_tmpfs(tmp_path / "state") as state_dir:
        yield state_dir


def start_agent(state_dir: Path, tmp_path: Path, fake_nvml_dir: Path, **env: str) -> AgentProcess:
    """An agent of 2 workers on the stand-in NVML, its own log kept off the state dir."""
    nvml_config = write_fake_nvml_config(tmp_path / "nvml.conf", DEFAULT_TEST_GPUS)
    base = {"UTOPIA_AGENT_GPU_BACKEND": "nvml", "UTOPIA_AGENT_STOP_TIMEOUT": "1", "UTOPIA_AGENT_RESTART_POLICY": "no",
            "UTOPIA_AGENT_NETWORK_ISOLATION": "off", **env}
    agent = AgentProcess(state_dir, free_port(), fake_nvml_env(fake_nvml_dir, nvml_config, {**os.environ, **base}), workers=2)
    agent.log_path = tmp_path / "agent.log"
    return agent.start()


def every_other_route(agent: AgentProcess, known: dict[str, str], tried: set[tuple[str, str]]) -> dict[str, int]:
    """Each route of the agent's OpenAPI document not `tried` yet, with `known` ids in its path and an
    empty body: whatever it answers (404, 400...), the status, by `METHOD path`; streams are closed at once."""
    statuses = {}
    for path, methods in agent.get("/openapi.json", auth=False).json()["paths"].items():
        for method in methods:
            if (method, path) in tried or method not in ("get", "post", "put", "patch", "delete"):
                continue
            url = path.format_map(collections.defaultdict(lambda: "nope", known))
            body = {"json": {}} if method in ("post", "put", "patch") else {}
            with agent.request(method.upper(), url, stream=True, timeout=10, **body) as answer:
                statuses[f"{method.upper()} {path}"] = answer.status_code
    return statuses


def revisions(state_dir: Path) -> list[int]:
    """Every revision in the event history, in file order; every line must parse."""
    found = []
    for name in ("previous.jsonl", "current.jsonl"):
        path = state_dir / "events" / name
        if path.exists():
            found += [json.loads(line)["revision"] for line in path.read_text().splitlines()]
    return found


def every_state_file_parses(state_dir: Path) -> None:
    for path in state_dir.rglob("*.json"):
        if path.name.startswith("."):
            raise AssertionError(f"a temporary file was left behind: {path}")
        json.loads(path.read_bytes())
    for path in state_dir.rglob("*.jsonl"):
        for line in path.read_text().splitlines()[1 if path.name == "view.jsonl" else 0:]:
            if line:
                json.loads(line)
    assert not list(state_dir.glob("*.tmp")), "a temporary view was left behind"


def test_a_full_state_dir_answers_507_and_deletes_work(small_state_dir, tmp_path, fake_nvml_dir, docker_client, test_image, claim):
    # Pressure off: each refusal here must come from a write that found no room.
    agent = start_agent(small_state_dir, tmp_path, fake_nvml_dir, UTOPIA_AGENT_DISK_PRESSURE_PERCENT="0")
    try:
        kept = agent.create(claim("kept"), TEST_IMAGE, gpu_count=1, command=["sleep", "600"])
        freed = agent.create(claim("freed"), TEST_IMAGE, gpu_count=1, command=["sleep", "600"])
        assert kept.status_code == freed.status_code == 201, (kept.text, freed.text)
        kept_id, freed_id = kept.json()["container_id"], freed.json()["container_id"]
        kept_gpus = agent.get(f"/api/v1/containers/{kept_id}").json()["gpu_ids"]
        before = int(agent.get("/api/v1/containers").headers["X-Utopia-Revision"])
        uuid = agent.get("/api/v1/gpus").json()[0]["uuid"]

        # A rewrite in flight while dd fills frees its old file's blocks a moment later: top up once
        # every background writer (the GPU sample, each second) has met the full disk.
        fillers = [fill(small_state_dir)]
        time.sleep(1.5)
        fillers.append(fill(small_state_dir, "top-up"))
        answers = {
            "create": agent.create(claim("refused"), TEST_IMAGE, gpu_count=1, command=["sleep", "600"]),
            "drain": agent.post("/api/v1/node/drain", json={"reason": "disk"}),
            "quarantine": agent.post(f"/api/v1/gpus/{uuid}/quarantine", json={"reason": "disk"}),
            "pull": agent.post("/api/v1/images", json={"image": "localhost:5999/none/nope:1"}),
            "list": agent.get("/api/v1/containers"),
            "get": agent.get(f"/api/v1/containers/{kept_id}"),
            "logs": agent.get(f"/api/v1/containers/{kept_id}/logs"),
            "stats": agent.get(f"/api/v1/containers/{kept_id}/stats"),
            "gpus": agent.get("/api/v1/gpus"),
            "node": agent.get("/api/v1/node"),
            "images": agent.get("/api/v1/images"),
            "metrics": agent.get("/api/v1/metrics"),
            "scrape": agent.get("/metrics"),
            "events": agent.get("/api/v1/events", params={"since": before}, stream=True, timeout=5),
            "resume": agent.delete("/api/v1/node/drain"),
            "release": agent.delete(f"/api/v1/gpus/{uuid}/quarantine"),
            "health": agent.get("/health", auth=False),
            "delete": agent.delete(f"/api/v1/containers/{freed_id}"),
        }
        statuses = {name: answer.status_code for name, answer in answers.items()}
        answers["events"].close()
        statuses.update(every_other_route(agent, {"container_id": kept_id, "uuid": uuid}, tried={
            ("post", "/api/v1/containers"), ("post", "/api/v1/node/drain"), ("post", "/api/v1/gpus/{uuid}/quarantine"), ("post", "/api/v1/images"),
            ("delete", "/api/v1/containers/{container_id}")}))
        assert not [name for name, status in statuses.items() if status >= 500 and status != 507], statuses
        assert statuses["delete"] == 204, statuses
        for name in ("list", "get", "logs", "stats", "gpus", "node", "images", "metrics", "scrape", "health"):
            assert statuses[name] == 200, (name, statuses)
        assert statuses["create"] == 507, answers["create"].text
        assert answers["create"].json()["filesystem"] == str(small_state_dir) and "has no room" in answers["create"].json()["message"]
        if statuses["drain"] == 507:
            assert agent.get("/api/v1/node").json()["drain"]["draining"] is False, "a refused drain was kept"
        assert wait_for(lambda: freed_id not in {c["id"] for c in agent.get("/api/v1/containers").json()}, 10)
        assert set(agent.worker_pids()) and agent.process.poll() is None

        for filler in fillers:
            filler.unlink()
        agent.delete("/api/v1/node/drain")
        agent.delete(f"/api/v1/gpus/{uuid}/quarantine")
        again = agent.create(claim("again"), TEST_IMAGE, gpu_count=1, command=["sleep", "600"])
        assert again.status_code == 201, again.text
        again_id = again.json()["container_id"]
        again_gpus = agent.get(f"/api/v1/containers/{again_id}").json()["gpu_ids"]
        assert not set(again_gpus) & set(kept_gpus), "a GPU is held twice"
        assert wait_for(lambda: int(agent.get("/api/v1/containers").headers["X-Utopia-Revision"]) > before, 10)
        every_state_file_parses(small_state_dir)
        written = revisions(small_state_dir)
        assert written == list(range(written[0], written[0] + len(written))), "revisions do not follow one another"

        agent.stop()
        agent.start()
        found = {c["claim_id"]: c["gpu_ids"] for c in agent.get("/api/v1/containers").json()}
        assert found == {claim("kept"): kept_gpus, claim("again"): again_gpus}
        assert int(agent.get("/api/v1/containers").headers["X-Utopia-Revision"]) >= written[-1]
    finally:
        agent.stop()


def node_change(agent: AgentProcess, since: int, action: str, timeout: float = 15) -> dict:
    """The first `node` change `action` after revision `since` on the event stream."""
    with agent.get("/api/v1/events", params={"since": since}, stream=True, timeout=timeout) as stream:
        for line in stream.iter_lines():
            change = json.loads(line)
            if change["kind"] == "node" and change["action"] == action:
                return change
    raise AssertionError(f"no node {action} on the stream")


def test_a_state_dir_filled_past_the_mark_is_disk_pressure(small_state_dir, tmp_path, fake_nvml_dir, test_image, claim):
    """Past 90% full (the default 10% free): creates 507 naming the state dir, /health 200 with the
    flag, the gauge, image collection at once, a node change when it starts and when it ends."""
    agent = start_agent(small_state_dir, tmp_path, fake_nvml_dir, UTOPIA_AGENT_EVENTS_HEARTBEAT_SECONDS="1")
    try:
        assert agent.get("/health", auth=False).json()["disk_pressure"] is False
        before = int(agent.get("/api/v1/containers").headers["X-Utopia-Revision"])
        collected_at = wait_for(lambda: json.loads((small_state_dir / "image-store.json").read_text())["at"]
                                if (small_state_dir / "image-store.json").exists() else None, 10)
        room = fill(small_state_dir, mb=23)
        started = node_change(agent, before, "disk_pressure")
        assert started["object"]["disk_pressure"] is True
        assert [fs["name"] for fs in started["object"]["filesystems"]] == ["state_dir"]
        refused = agent.create(claim("refused"), TEST_IMAGE, command=["sleep", "600"])
        assert refused.status_code == 507 and refused.json()["error"] == "insufficient_storage", refused.text
        assert refused.json()["filesystem"] == str(small_state_dir) and "disk pressure" in refused.json()["message"]
        health = agent.get("/health", auth=False)
        assert health.status_code == 200 and health.json()["disk_pressure"] is True
        assert 'utopia_agent_disk_pressure{filesystem="state_dir"} 1.0' in agent.get("/metrics").text
        assert agent.get("/api/v1/node").json()["disk"]["pressure"] is True
        assert json.loads((small_state_dir / "image-store.json").read_text())["at"] > collected_at, "image collection did not run"

        room.unlink()
        ended = node_change(agent, started["revision"], "disk_pressure_ended")
        assert ended["object"] == {"disk_pressure": False, "filesystems": []}
        assert wait_for(lambda: agent.get("/health", auth=False).json()["disk_pressure"] is False, 5)
        assert agent.create(claim("taken"), TEST_IMAGE, command=["sleep", "600"]).status_code == 201
        assert 'utopia_agent_disk_pressure{filesystem="state_dir"} 0.0' in agent.get("/metrics").text
        assert agent.get("/api/v1/node").json()["disk"]["pressure"] is False
    finally:
        agent.stop()


def test_the_engines_data_root_under_the_mark_is_disk_pressure(tmp_path, fake_nvml_dir, docker_client, test_image, claim):
    """A mark above the data root's free share: creates 507 naming the engine's data root."""
    data_root = docker_client.info()["DockerRootDir"]
    free = os.statvfs(data_root).f_bavail * 100 / os.statvfs(data_root).f_blocks
    with small_tmpfs(tmp_path / "state") as state_dir:  # all but empty: not under pressure itself
        agent = start_agent(state_dir, tmp_path, fake_nvml_dir, UTOPIA_AGENT_DISK_PRESSURE_PERCENT=str(min(100, int(free) + 1)))
        try:
            assert wait_for(lambda: agent.get("/health", auth=False).json()["disk_pressure"], 15)
            refused = agent.create(claim("refused"), TEST_IMAGE, command=["sleep", "600"])
            assert refused.status_code == 507, refused.text
            assert refused.json()["filesystem"] == data_root and "the engine's data root" in refused.json()["message"]
            scrape = agent.get("/metrics").text
            assert 'utopia_agent_disk_pressure{filesystem="data_root"} 1.0' in scrape
            assert 'utopia_agent_disk_pressure{filesystem="state_dir"} 0.0' in scrape
        finally:
            agent.stop()
