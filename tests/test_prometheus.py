"""GET /metrics: dcgm-exporter's GPU series and the agent's own figures, summed across workers."""

from __future__ import annotations

import json

import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.fake_nvml import DEFAULT_TEST_GPUS
from tests.support.polling import wait_for
from tests.support.scrape import sample, scrape
from utopia_agent.node.state_dir import METRICS_DIR

REQUESTS = "utopia_agent_http_request_duration_seconds"


def test_gpu_series_use_dcgm_exporter_names_and_labels(agent):
    families = scrape(agent)
    temps = {s.labels["gpu"]: s for s in families["DCGM_FI_DEV_GPU_TEMP"]}
    assert set(temps) == {"0", "1", "2", "4", "5", "7"}, "no reading for Not Supported (3) or lost (6) GPUs"
    assert temps["0"].labels["UUID"] == DEFAULT_TEST_GPUS[0].uuid
    assert temps["0"].labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert temps["0"].labels["Hostname"] and temps["0"].value == 30
    assert sample(families, "DCGM_FI_DEV_FB_FREE", gpu="0") == 81559
    assert sample(families, "DCGM_FI_DEV_FB_USED", gpu="0") == 0
    assert sample(families, "DCGM_FI_DEV_GPU_UTIL", gpu="0") == 0
    assert sample(families, "utopia_agent_gpus", state="lost") == 1
    assert {s.labels["state"] for s in families["utopia_agent_gpus"]} == {"free", "allocated", "releasing", "quarantined", "lost"}
    assert sample(families, "utopia_agent_engine_up") == 1
    assert sample(families, "utopia_agent_nvml_hung") == 0


def test_gpu_health_series_use_dcgm_exporter_names(agent):
    families = scrape(agent)
    for name in (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_RETIRED_PENDING", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_PENDING", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    ):
        assert sample(families, name, gpu="0", UUID=DEFAULT_TEST_GPUS[0].uuid) == 0
        assert "6" not in {s.labels["gpu"] for s in families[name]}, "a lost GPU reports no counters"
    assert sample(families, "DCGM_FI_DEV_XID_ERRORS", gpu="0") == 0
    assert 0 <= sample(families, "utopia_agent_gpu_sample_age_seconds") < 30
    assert sample(families, "utopia_agent_node_draining") == 0


def requests_per_worker(agent, route: str) -> dict[int, float]:
    """Each worker's own count of answered GETs on `route`, from its prometheus-client file
    (one per worker pid); a scrape must sum these."""
    counts: dict[int, float] = {}
    for path in (agent.state_dir / METRICS_DIR).glob("histogram_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample_name, labels, _ = json.loads(key)
            labels.pop("le", None)  # each bucket is stored apart: together they count every request
            if sample_name == f"{REQUESTS}_bucket" and labels == {"route": route, "method": "GET", "status": "200"} and value:
                pid = int(path.stem.removeprefix("histogram_"))
                counts[pid] = counts.get(pid, 0) + value
    return counts


def test_request_histograms_add_up_across_workers(agent_factory):
    agent = agent_factory(workers=2)
    route = "/api/v1/containers"
    sent = []

    def send_one_more() -> None:
        # A fresh connection each time, so the requests spread over the workers.
        assert agent.get(route, headers={"Connection": "close"}).status_code == 200
        sent.append(route)

    def each_worker_answered() -> bool:
        if len(requests_per_worker(agent, route)) == 2:
            return True
        send_one_more()
        return False

    for _ in range(40):
        send_one_more()
    both_answered = wait_for(each_worker_answered, timeout=30, interval=0)
    per_worker = requests_per_worker(agent, route)
    assert both_answered and all(per_worker.values()), f"one worker answered all {len(sent)}: {per_worker}"
    assert sum(per_worker.values()) == len(sent)
    assert sample(scrape(agent), f"{REQUESTS}_count", route=route, method="GET", status="200") == len(sent)
    assert agent.log().count(f'"route": "{route}"') == len(sent), "one log line per request"


@pytest.mark.usefixtures("nvidia_path")
def test_creates_and_allocations_are_counted(agent, test_image, claim):
    def creates(families, outcome):
        try:
            return sample(families, "utopia_agent_container_creates_total", outcome=outcome)
        except KeyError:
            return 0

    before = scrape(agent)
    assert agent.create(claim("a"), test_image, gpu_count=2, command=["sleep", "300"]).status_code == 201
    assert agent.create(claim("a"), test_image).status_code == 409
    assert agent.create(claim("b"), test_image, gpu_count=64).status_code == 409
    after = scrape(agent)
    assert creates(after, "created") == creates(before, "created") + 1
    assert creates(after, "claim_exists") == creates(before, "claim_exists") + 1
    assert creates(after, "no_gpus_free") == creates(before, "no_gpus_free") + 1
    assert sample(after, "utopia_agent_gpus", state="allocated") == 2
    assert sample(after, "utopia_agent_gpus", state="free") == 5
    assert sample(after, "utopia_agent_containers", state="running") >= 1


def test_scrape_needs_the_token_unless_configured_otherwise(agent, agent_factory):
    assert agent.get("/metrics", auth=False).status_code == 401
    assert agent.get("/metrics", headers={"Authorization": "Bearer wrong"}, auth=False).status_code == 401
    open_agent = agent_factory(workers=1, UTOPIA_AGENT_PROMETHEUS_AUTH="none")
    assert "DCGM_FI_DEV_GPU_TEMP" in scrape(open_agent, auth=False)


@pytest.mark.usefixtures("nvidia_path")
def test_container_events_and_pulls_are_logged_and_counted(agent, docker_client, test_image, claim):
    """Every container created, rolled back and deleted is one log line naming its claim and GPUs."""
    created = agent.create(claim("ok"), test_image, gpu_count=1, command=["sleep", "300"])
    assert created.status_code == 201
    container_id = created.json()["container_id"]
    gpu = agent.get(f"/api/v1/containers/{container_id}").json()["gpu_ids"][0]
    assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
    assert agent.create(claim("bad"), test_image, command=["/no/such/binary"]).status_code == 400
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    events = {(e["message"].split(" claim=")[0], e.get("claim_id")): e for e in lines if (e.get("claim_id") or "").startswith(claim(""))}
    assert events[("container created", claim("ok"))]["gpu_ids"] == [gpu]
    assert events[("container deleted", claim("ok"))]["container_id"] == container_id
    assert "rolled back" in events[("container rolled back", claim("bad"))]["message"]
    families = scrape(agent)
    assert sample(families, "utopia_agent_container_deletes_total") >= 1
    assert sample(families, "utopia_agent_container_creates_total", outcome="engine_rejected") >= 1


def test_engine_outage_shows_in_the_scrape(agent_factory, tmp_path):
    down = agent_factory(workers=1, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock", UTOPIA_AGENT_ENGINE_TIMEOUT="2")
    families = scrape(down)
    assert sample(families, "utopia_agent_engine_up") == 0
    assert len(families["DCGM_FI_DEV_GPU_TEMP"]) == 6, "GPU figures still come without the engine"
