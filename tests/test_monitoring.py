"""The dashboard and the alerts against a real Prometheus scraping a real agent, and promtool's own checks."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import RUN_ID
from tests.support.agent import ROOT
from tests.support.certificates import tls_env
from tests.support.engine import free_port
from tests.support.polling import wait_for
from tests.support.prerequisites import require
from utopia_agent.client import ClaimExists, ImagePullFailed, NotFound

DASHBOARD = ROOT / "deploy" / "grafana" / "utopia-node.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SCRAPE_SECONDS = 1
READ_TOKEN = "prometheus-read-token-0123456789"
# Grafana's variables, as a query in this test reads them.
TEMPLATE_VALUES = {"$instance": ".*", "$__rate_interval": "1m"}


def dashboard_panels() -> list[dict]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    require(shutil.which("promtool") is not None, "promtool is not installed (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_alert_rules_pass_promtool_check():
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_all_pass():
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    quiet = {check["alertname"] for case in cases for check in case["alert_rule_test"] if not check["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names and quiet == names, "each alert is shown to fire, and not to fire too soon"
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_dashboard_is_one_grafana_document_with_a_query_per_panel():
    document = json.loads(DASHBOARD.read_text())
    panels = document["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert {v["name"] for v in document["templating"]["list"]} == {"datasource", "instance"}
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert all('instance=~"$instance"' in target["expr"] for target in panel["targets"]), panel["title"]


class Prometheus:
    """`prometheus` scraping one agent every second with `token`, with the alert rules loaded;
    over HTTPS, as docs/operations.md configures it, when the agent serves it."""

    def __init__(self, workdir: Path, agent, token: str):
        self.agent = agent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        token_file = workdir / "token"
        token_file.write_text(token + "\n")
        job = {
            "job_name": "utopia-agent",
            "authorization": {"credentials_file": str(token_file)},
            "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}],
        }
        if agent.base_url.startswith("https:"):
            job.update(scheme="https", tls_config={"ca_file": str(agent.ca_file)})
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [job],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> list[dict]:
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def exercise(agent, test_image: str, claim_id: str) -> None:
    """One round of what the panels count: a create, a refused twin, a delete, a 404 and a failed pull."""
    with agent.new_client(retries=0) as client:
        created = client.create(claim_id, test_image, gpu_count=1, command=["sleep", "300"])
        with pytest.raises(ClaimExists):
            client.create(claim_id, test_image + "-other")
        client.delete(created.container_id)
        with pytest.raises(NotFound):
            client.get("0" * 12)
        with pytest.raises(ImagePullFailed):
            client.create(f"{claim_id}-pull", f"localhost:{free_port()}/utopia-test/nope:1")


@pytest.fixture(scope="module")
def prometheus(module_agents, test_image, nvidia_path, tmp_path_factory, pki):
    """A Prometheus that has scraped the agent before and after each of two rounds of events, so rates are not zero.

    As deployed across a network: over HTTPS, with the read-only token (which cannot change anything)."""
    require(shutil.which("prometheus") is not None, "prometheus is not installed (apt-get install prometheus)")
    agent = module_agents(workers=2, ca_file=pki.ca_file, UTOPIA_AGENT_READ_TOKEN=READ_TOKEN, **tls_env(pki.server))
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), agent, READ_TOKEN)
    running = None
    try:
        assert wait_for(server.ready, 60), server.log_path.read_text()[-3000:]
        assert wait_for(lambda: server.value('up{job="utopia-agent"}') == 1, 30), server.log_path.read_text()[-3000:]
        for deletes in (1, 2):
            exercise(agent, test_image, f"t{RUN_ID}-monitoring-{deletes}")
            assert wait_for(lambda seen=deletes: server.value("sum(utopia_agent_container_deletes_total)") == seen, 30)
        # A claim that runs on through the module, so its per-claim series (its measured disk) are scraped: named
        # outside the run's prefix, which each test's cleanup removes, and deleted here at the end.
        with agent.new_client(retries=0) as client:
            running = client.create(f"m{RUN_ID}-monitoring-running", test_image, disk_gb=1, command=["sleep", "300"]).container_id
        assert wait_for(lambda: server.value("count(utopia_agent_claim_disk_used_bytes)") >= 1, 30)
        yield server
    finally:
        server.stop()
        if running is not None:
            agent.delete(f"/api/v1/containers/{running}")


def panel_params() -> list:
    return [
        pytest.param(panel, id=panel["title"])
        for panel in dashboard_panels()
    ]


def substitute(expr: str) -> str:
    for variable, value in TEMPLATE_VALUES.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.parametrize("panel", panel_params())
def test_every_panel_query_returns_data(prometheus, panel):
    for target in panel["targets"]:
        result = prometheus.query(substitute(target["expr"]))
        values = [float(series["value"][1]) for series in result]
        assert values, f"{panel['title']}: no series for {target['expr']}"
        assert not all(math.isnan(v) for v in values), f"{panel['title']}: only NaN for {target['expr']}"


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its words less label matchers, ranges, groupings, functions and keywords."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    words = set(re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", bare))
    return words - {"and", "or", "unless", "bool", "offset"}


def alert_params() -> list:
    return [pytest.param(rule, id=rule["alert"]) for rule in alert_rules()]


@pytest.mark.parametrize("rule", alert_params())
def test_every_alert_reads_series_the_agent_serves(prometheus, rule):
    """Each metric an alert reads is in Prometheus after scraping the agent (the unit tests only prove the logic)."""
    names = series_names(rule["expr"])
    assert names, rule["expr"]
    for name in names:
        assert prometheus.query(f"count({name})"), f"{rule['alert']}: Prometheus has no {name}"


def test_prometheus_scrapes_over_https_with_the_read_only_token(prometheus):
    """The target is up on https:// with the read-only token, and the certificate's expiry is a series."""
    target = next(t for t in requests.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"])
    assert target["health"] == "up" and target["scrapeUrl"].startswith("https://"), target
    expiry = prometheus.value("utopia_agent_tls_certificate_expiry_seconds")
    assert 20 * 86400 < expiry - time.time() < 31 * 86400, expiry
    assert READ_TOKEN not in prometheus.agent.log()


def test_an_alert_goes_pending_on_the_agents_real_series(prometheus):
    """The stand-in NVML has one lost GPU (index 6): the GPU-lost alert matches it, and waits out its `for`."""
    pending = wait_for(lambda: prometheus.query('ALERTS{alertname="UtopiaGpuLost", alertstate="pending"}'), 30)
    assert pending and pending[0]["metric"]["instance"] == f"127.0.0.1:{prometheus.agent.port}"
    assert not prometheus.query('ALERTS{alertstate="firing"}'), "nothing else is wrong with this node"
