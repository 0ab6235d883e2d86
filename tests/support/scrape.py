"""Reading the agent's Prometheus exposition back in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def scrape(agent, auth: bool = True) -> dict[str, list]:
    """GET /metrics and parse it: family name -> its samples."""
    response = agent.get("/metrics", auth=auth)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def sample(families, name: str, **labels) -> float:
    """The value of the first sample `name` whose labels include `labels`; KeyError if none."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for s in families[family]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))
