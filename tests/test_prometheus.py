"""GET /metrics: dcgm-exporter's GPU series and the agent's own figures, summed across workers."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_nvml import DEFAULT_TEST_GPUS

pytestmark = pytest.mark.docker


def scrape(agent, auth: bool = True) -> dict[str, list]:
    response = agent.get("/metrics", auth=auth)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def sample(families, name: str, **labels) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for s in families[family]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


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
    assert sample(families, "utopia_agent_gpus", state="unhealthy") == 1
    assert sample(families, "utopia_agent_engine_up") == 1


def test_request_histograms_add_up_across_workers(agent):
    route = "/api/v1/containers"
    before = scrape(agent)
    try:
        start = sample(before, "utopia_agent_http_request_duration_seconds_count", route=route, method="GET", status="200")
    except KeyError:
        start = 0
    for _ in range(40):
        assert requests.get(agent.base_url + route, headers={"Authorization": f"Bearer {agent.token}"}).status_code == 200
    after = scrape(agent)
    assert sample(after, "utopia_agent_http_request_duration_seconds_count", route=route, method="GET", status="200") == start + 40
    assert agent.log().count('"route": "/api/v1/containers"') >= 40


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
