"""Tenant networks on the main engine (it manages iptables), proved with real traffic from inside
real containers: a claim reaches the outside world and serves its published ports, and reaches
neither another claim, nor the node, nor the metadata service, nor a blocked network; also after
an agent restart, an engine restart and a flush of the agent's rules. Every probe that must fail
has a control that shows the same probe succeeds where the agent's rules do not apply."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import docker
import pytest

from tests.conftest import RUN_ID
from tests.support.agent import ROOT
from tests.support.engine import restart_engine
from tests.support.hosts import (
    NODE_MARKER,
    Probe,
    dns_server,
    namespace_host,
    node_address,
    node_fetch,
    node_listener,
    node_resolv_conf,
    reach_all,
    resolves,
)
from tests.support.polling import wait_for
from tests.support.prerequisites import require
from tests.support.scrape import sample, scrape
from utopia_agent.config import load_config
from utopia_agent.network.firewall import Firewall
from utopia_agent.network.isolation import CHECK_INTERVAL_SECONDS, IsolationPlan

# The outside world (198.18.0.2) and a blocked network behind it (198.18.9.2), the metadata
# service (169.254.169.254, routed past the node) and a second address of the node (198.18.5.1).
OUTSIDE, BLOCKED, METADATA, SECOND_ADDRESS = "198.18.0.2", "198.18.9.2", "169.254.169.254", "198.18.5.1"
# Alibaba Cloud's ECS metadata and Azure's WireServer: blocked by default, outside 169.254.0.0/16.
CLOUD_ENDPOINTS = ("100.100.100.200", "168.63.129.16")


@pytest.fixture(scope="module", autouse=True)
def _main_engine(engine):
    require(not os.environ.get("DOCKER_HOST") and os.geteuid() == 0,
            "isolation tests need root and the main engine, which manages iptables (DOCKER_HOST is a private one)")


@pytest.fixture(scope="module")
def world(engine):
    """The outside world with a blocked network behind it, the metadata host, a listener on every
    address of the node, and a second address of the node's own."""
    with namespace_host("198.18.0.1/24", (f"{OUTSIDE}/24", f"{BLOCKED}/24"), routes=("198.18.9.0/24",)) as outside, \
            namespace_host("198.18.2.1/24", (f"{METADATA}/16",), routes=(f"{METADATA}/32",)) as metadata, \
            node_address(SECOND_ADDRESS), node_listener() as listener_port:
        yield {"outside": outside, "metadata": metadata, "listener_port": listener_port}


@pytest.fixture(scope="module")
def isolated_agent(module_agents, test_image, world):
    # The engine picks this one's subnet from its own pools, as it does on a node.
    return module_agents(workers=2, UTOPIA_AGENT_BLOCKED_NETWORKS="198.18.9.0/24", UTOPIA_AGENT_NETWORK_SUBNET="")


@pytest.fixture
def control(docker_client, test_image):
    """A container on the engine's default bridge, made by the test, not the agent: the agent's rules
    do not apply to it, so what it reaches shows each probe works."""
    container = control_container(docker_client, test_image)
    yield container
    container.remove(force=True)


@pytest.fixture(scope="module")
def clouds(engine):
    """The clouds' endpoints outside link-local, where those clouds put them, serving HTTP."""
    endpoints = tuple(f"{address}/32" for address in CLOUD_ENDPOINTS)
    with namespace_host("198.18.3.1/24", endpoints, routes=endpoints) as host:
        yield host


def control_container(docker_client, test_image):
    """A container on the engine's default bridge (see `control`), made now: it gets the node's resolv.conf as it is now."""
    return docker_client.containers.run(test_image, ["sleep", "600"], detach=True, labels={"utopia-test-run": RUN_ID},
                                        name=f"utopia-control-{uuid.uuid4().hex[:8]}")


def plan_of(agent) -> IsolationPlan:
    return IsolationPlan.for_config(load_config(agent.env))


CLAIM_A_MARKER = "utopia-test-claim-a"


def start_claims(agent, claim, test_image, docker_client, port: int):
    """Claim A serves HTTP on 8080, published on `port`; claim B only sleeps."""
    serve = f"mkdir -p /tmp/www && echo {CLAIM_A_MARKER} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    a = agent.create(claim("a"), test_image, command=["sh", "-c", serve],
                     port_mappings=[{"host_port": port, "container_port": 8080}])
    b = agent.create(claim("b"), test_image, command=["sleep", "600"])
    assert a.status_code == 201 and b.status_code == 201, (a.text, b.text)
    return docker_client.containers.get(a.json()["container_id"]), docker_client.containers.get(b.json()["container_id"])


def address_of(container, network: str) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]


def assert_isolated(agent, world, a, b, port: int, control=None) -> None:
    network = plan_of(agent).network.name
    a_ip, gateway = address_of(a, network), a.attrs["NetworkSettings"]["Networks"][network]["Gateway"]
    listener, outside, metadata = world["listener_port"], world["outside"], world["metadata"]
    probes = {
        "claim B -> claim A, unpublished": Probe(b, a_ip, 8080, CLAIM_A_MARKER),
        "claim B -> claim A, published, by the node's address": Probe(b, SECOND_ADDRESS, port, CLAIM_A_MARKER),
        "claim B -> the node, bridge gateway": Probe(b, gateway, listener, NODE_MARKER),
        "claim B -> the node, second address": Probe(b, SECOND_ADDRESS, listener, NODE_MARKER),
        "claim B -> metadata": Probe(b, METADATA, 80, metadata.marker),
        "claim B -> blocked network": Probe(b, BLOCKED, 80, outside.marker),
        "claim B -> the outside world": Probe(b, OUTSIDE, 80, outside.marker),
    }
    if control is not None:
        probes |= {
            "control -> the node, second address": Probe(control, SECOND_ADDRESS, listener, NODE_MARKER),
            "control -> metadata": Probe(control, METADATA, 80, metadata.marker),
            "control -> blocked network": Probe(control, BLOCKED, 80, outside.marker),
        }
    reached = reach_all(probes)
    assert reached == {name: name.endswith("outside world") or name.startswith("control") for name in probes}
    # A's published port serves from the node and from outside it; A's own port answers the node.
    assert CLAIM_A_MARKER in node_fetch(f"http://127.0.0.1:{port}/"), "A's published port does not serve the node"
    assert CLAIM_A_MARKER in node_fetch(f"http://{a_ip}:8080/"), "the node does not reach A (the control of B -> A)"
    assert outside.fetch(f"http://198.18.0.1:{port}/", CLAIM_A_MARKER), "A's published port does not serve the outside world"


def test_claims_reach_the_world_and_nothing_else(isolated_agent, world, claim, test_image, docker_client, control, tmp_path):
    agent = isolated_agent
    port = 24101
    a, b = start_claims(agent, claim, test_image, docker_client, port)
    # The claim's network is the agent's own, with inter-container traffic off.
    plan = plan_of(agent)
    assert a.attrs["HostConfig"]["NetworkMode"] == plan.network.name
    network = docker_client.networks.get(plan.network.name)
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert_isolated(agent, world, a, b, port, control)

    node = agent.get("/api/v1/node").json()["network"]
    assert node["isolation"] == "on" and node["rules_in_place"] is True and node["problem"] is None
    assert node["name"] == plan.network.name and node["bridge"] == plan.network.bridge and node["subnet"]
    assert "198.18.9.0/24" in node["blocked_networks"] and "169.254.0.0/16" in node["blocked_networks"]
    assert sample(scrape(agent), "utopia_agent_network_isolation_ok") == 1

    # An agent restart keeps everything: while it is down the claims keep their protection.
    agent.stop()
    assert Firewall().problems(plan.rules) == []
    agent.start()
    assert_isolated(agent, world, a, b, port)


def test_flushed_rules_are_restored_within_seconds(isolated_agent, world, claim, test_image, docker_client):
    agent = isolated_agent
    port = 24102
    a, b = start_claims(agent, claim, test_image, docker_client, port)
    plan = plan_of(agent)
    subprocess.run(["iptables", "-w", "-F", plan.rules.input_chain], check=True)
    subprocess.run(["iptables", "-w", "-D", "INPUT", "-i", plan.rules.bridge, "-j", plan.rules.input_chain], check=True)
    subprocess.run(["iptables", "-w", "-F", plan.rules.forward_chain], check=True)
    assert Firewall().problems(plan.rules)
    assert wait_for(lambda: Firewall().problems(plan.rules) == [], timeout=4 * CHECK_INTERVAL_SECONDS), "the rules were not restored"
    assert wait_for(lambda: "firewall rules restored" in agent.log(), timeout=5)
    assert_isolated(agent, world, a, b, port)


def failing_iptables(directory: Path, switch: Path) -> dict[str, str]:
    """PATH with iptables and iptables-restore that fail as without permission while `switch` exists
    (an operator's tool or a lost capability), and run the real ones otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("iptables", "iptables-restore"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True, check=True).stdout.strip()
        script = directory / tool
        script.write_text(f'#!/bin/sh\nif [ -e "{switch}" ]; then echo "{tool}: Permission denied (you must be root)" >&2; exit 4; fi\n'
                          f'exec {real} "$@"\n')
        script.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_rules_that_cannot_be_restored_make_health_and_creates_503(agent_factory, test_image, claim, tmp_path, docker_client):
    switch = tmp_path / "iptables-fails"
    agent = agent_factory(workers=2, **failing_iptables(tmp_path / "bin", switch))
    plan = plan_of(agent)
    assert agent.get("/health", auth=False).status_code == 200
    switch.touch()
    subprocess.run(["iptables", "-w", "-F", plan.rules.input_chain], check=True)

    assert wait_for(lambda: agent.get("/health", auth=False).status_code == 503, timeout=4 * CHECK_INTERVAL_SECONDS), \
        "/health stayed 200 with the rules gone"
    answer = agent.get("/health", auth=False)
    assert "Permission denied" in answer.json()["reason"] and answer.headers["Retry-After"]
    refused = agent.create(claim("x"), test_image, command=["sleep", "60"])
    assert refused.status_code == 503 and refused.json()["error"] == "network_unprotected" and refused.headers["Retry-After"]
    assert not docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim('x')}"})
    assert sample(scrape(agent), "utopia_agent_network_isolation_ok") == 0
    assert agent.get("/api/v1/node").json()["network"]["rules_in_place"] is False
    assert sum("cannot be restored" in line for line in agent.log().splitlines()) == 1, "one line per event, not per check"

    switch.unlink()
    assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=4 * CHECK_INTERVAL_SECONDS)
    assert agent.create(claim("x"), test_image, command=["sleep", "60"]).status_code == 201


def start_refused(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    state_dir = tmp_path / "state"
    base = {**os.environ, "UTOPIA_AGENT_TOKEN": "t" * 16, "UTOPIA_AGENT_STATE_DIR": str(state_dir), "UTOPIA_AGENT_BIND": "127.0.0.1:0",
            "UTOPIA_AGENT_GPU_BACKEND": "none"}
    return subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_an_agent_that_cannot_isolate_claims_does_not_start(tmp_path, engine):
    switch = tmp_path / "iptables-fails"
    switch.touch()
    refused = start_refused(tmp_path, failing_iptables(tmp_path / "bin", switch))
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "UTOPIA_AGENT_NETWORK_ISOLATION=on, but claims cannot be isolated" in lines[0]
    assert "Permission denied" in lines[0]
    bad_subnet = start_refused(tmp_path, {"UTOPIA_AGENT_NETWORK_SUBNET": "10.1.2.3/33"})
    assert bad_subnet.returncode == 2 and "UTOPIA_AGENT_NETWORK_SUBNET" in bad_subnet.stderr


def test_isolation_off_puts_claims_on_the_default_bridge_and_removes_the_agents_rules(agent_factory, test_image, claim, docker_client):
    agent = agent_factory(workers=1)
    plan = plan_of(agent)
    kept = agent.create(claim("kept"), test_image, command=["sleep", "600"]).json()["container_id"]
    agent.stop()
    assert Firewall().problems(plan.rules) == [], "a clean stop with a claim running keeps its rules"
    agent.env["UTOPIA_AGENT_NETWORK_ISOLATION"] = "off"
    agent.start()
    assert Firewall().problems(plan.rules), "isolation off removes the agent's rules"
    plain = agent.create(claim("plain"), test_image, command=["sleep", "600"]).json()["container_id"]
    assert docker_client.containers.get(plain).attrs["HostConfig"]["NetworkMode"] in ("default", "bridge")
    assert agent.get("/api/v1/node").json()["network"] == {"isolation": "off"}
    assert docker_client.networks.get(plan.network.name).attrs["Containers"], "the network stays while a claim is on it"
    assert kept


def test_claims_made_before_isolation_are_listed_as_unprotected(agent_factory, test_image, claim, docker_client):
    agent = agent_factory(workers=1, UTOPIA_AGENT_NETWORK_ISOLATION="off")
    assert agent.create(claim("old"), test_image, command=["sleep", "600"]).status_code == 201
    agent.stop()
    del agent.env["UTOPIA_AGENT_NETWORK_ISOLATION"]
    agent.start()
    assert agent.get("/api/v1/node").json()["network"]["unprotected_claims"] == [claim("old")]
    assert any("not isolated" in line and claim("old") in line for line in agent.log().splitlines())
    assert sample(scrape(agent), "utopia_agent_network_unprotected_claims") == 1


def test_agents_on_one_engine_keep_to_their_own_network_and_rules(agent_factory, test_image, docker_client):
    first, second = agent_factory(workers=1), agent_factory(workers=1)
    one, two = plan_of(first), plan_of(second)
    assert one.network.name != two.network.name and one.rules.input_chain != two.rules.input_chain
    assert Firewall().problems(one.rules) == [] and Firewall().problems(two.rules) == []
    first.stop()
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(one.network.name)
    assert Firewall().problems(one.rules), "an agent with no claims leaves no rules behind"
    assert Firewall().problems(two.rules) == [] and docker_client.networks.get(two.network.name)


def test_isolation_holds_after_the_engine_restarts(isolated_agent, world, claim, test_image, docker_client, engine):
    require(engine.process is not None or os.environ.get("CI") == "true" or os.environ.get("UTOPIA_TEST_RESTART_ENGINE") == "1",
            "restarting the main engine stops every container on it: CI does it, or set UTOPIA_TEST_RESTART_ENGINE=1")
    agent = isolated_agent
    port = 24103
    a, b = start_claims(agent, claim, test_image, docker_client, port)
    restart_engine()
    for container in (a, b):  # the engine stopped them (the agent gives test claims no restart policy)
        docker_client.api.start(container.id)
    plan = plan_of(agent)
    assert wait_for(lambda: Firewall().problems(plan.rules) == [], timeout=4 * CHECK_INTERVAL_SECONDS)
    assert wait_for(lambda: agent.get("/health", auth=False).status_code == 200, timeout=30)
    assert_isolated(agent, world, a, b, port)


def test_the_clouds_metadata_outside_link_local_is_closed_by_default(isolated_agent, clouds, claim, test_image, docker_client, control):
    made = isolated_agent.create(claim("b"), test_image, command=["sleep", "600"])
    assert made.status_code == 201, made.text
    b = docker_client.containers.get(made.json()["container_id"])
    probes = {f"{who} -> {address}": Probe(container, address, 80, clouds.marker)
              for who, container in (("claim", b), ("control", control)) for address in CLOUD_ENDPOINTS}
    assert reach_all(probes) == {name: name.startswith("control") for name in probes}
    blocked = isolated_agent.get("/api/v1/node").json()["network"]["blocked_networks"]
    assert {f"{address}/32" for address in CLOUD_ENDPOINTS} <= set(blocked) and "198.18.9.0/24" in blocked


def test_claims_resolve_through_the_nodes_resolvers_and_reach_nothing_else_there(isolated_agent, world, claim, test_image, docker_client):
    """A resolver where GCE puts it (the metadata server) and one on the node's own address (a local
    cache): the keeper follows the node's resolv.conf, the claim resolves through each and still
    reaches nothing else at that address, as a container on the default bridge shows the probes work."""
    agent, metadata, listener = isolated_agent, world["metadata"], world["listener_port"]
    resolvers = {METADATA: (metadata.marker, 80), SECOND_ADDRESS: (NODE_MARKER, listener)}
    with dns_server(METADATA, namespace=metadata.namespace), dns_server(SECOND_ADDRESS):
        for number, (resolver, (marker, port)) in enumerate(resolvers.items()):
            controls = []
            with node_resolv_conf(resolver):
                try:
                    assert wait_for(lambda expected=[resolver]: agent.get("/api/v1/node").json()["network"]["resolvers"] == expected,
                                    timeout=4 * CHECK_INTERVAL_SECONDS), f"the keeper did not follow resolv.conf to {resolver}"
                    made = agent.create(claim(f"dns{number}"), test_image, command=["sleep", "600"])
                    assert made.status_code == 201, made.text
                    claimed = docker_client.containers.get(made.json()["container_id"])
                    controls.append(control_container(docker_client, test_image))
                    http = reach_all({"claim": Probe(claimed, resolver, port, marker), "control": Probe(controls[0], resolver, port, marker)})
                    assert (resolves(controls[0]), resolves(claimed)) == (True, True), f"a claim cannot resolve through {resolver}"
                    assert http == {"claim": False, "control": True}, f"HTTP at the resolver {resolver}"
                finally:
                    for container in controls:
                        container.remove(force=True)
    assert wait_for(lambda: agent.get("/api/v1/node").json()["network"]["resolvers"] != [SECOND_ADDRESS], timeout=4 * CHECK_INTERVAL_SECONDS)


def test_check_reports_the_isolation_state(isolated_agent, tmp_path):
    def check(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "utopia_agent.cli", "check"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    ok = check(isolated_agent.env)
    network = [line for line in ok.stdout.splitlines() if line.startswith("network:")]
    assert ok.returncode == 0 and network and network[0].startswith("network: ok, isolation on")
    assert "198.18.9.0/24" in network[0] and "rules in place" in network[0] and "DNS allowed to" in network[0]
    switch = tmp_path / "iptables-fails"
    switch.touch()
    refused = check({**isolated_agent.env, **failing_iptables(tmp_path / "bin", switch)})
    assert refused.returncode == 1 and "network: claims cannot be isolated" in refused.stderr
