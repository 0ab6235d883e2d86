"""`make bench` draws its run: the PNG from the JSON it writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import docker

from tests.support.agent import ROOT
from tests.support.polling import wait_for
from utopia_agent.engine.networks import STATE_DIR_LABEL
from utopia_agent.network.firewall import Firewall
from utopia_agent.network.isolation import IsolationPlan


def test_bench_draws_each_timed_path_as_distributions(tmp_path):
    rng = random.Random(7)

    def series(median: float) -> list[float]:
        return [round(rng.lognormvariate(0, 0.3) * median, 3) for _ in range(50)]

    figures = [
        {"figure": "GET /api/v1/containers (100 claims)", "target": "≤ 1.2×", "ratio": 0.25,
         "samples": {"agent": series(1.2), "engine list": series(5.0), "bare stack": series(0.9)}},
        {"figure": "DELETE /api/v1/containers/<id>", "target": "≤ 1.05×", "ratio": 1.0,
         "samples": {"agent": series(1100), "engine stop and remove": series(1100), "bare stack": series(0.9)}},
        {"figure": "RSS per worker after the run", "target": "≤ 60 MiB", "value": "max 48 MiB", "samples": {}},
    ]
    results = tmp_path / "run.json"
    results.write_text(json.dumps({
        "when": "2026-11-25T10:00:00+00:00", "quick": True, "figures": figures,
        "machine": {"cpu_model": "AMD EPYC", "cores": 2, "engine_version": "20.10.24"},
    }))
    drawn = subprocess.run([sys.executable, "benchmarks/bench.py", "--draw", str(results)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert drawn.returncode == 0, drawn.stderr
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1100 and 400 < height < 1000, "two panels of three series, none for a figure without samples"


def test_an_interrupted_bench_leaves_no_container_network_or_chain(engine, tmp_path):
    """Ctrl-C once the bench's claims run on its agent's network (the agent's own stop keeps a network
    with claims on it, as in production): its sweep removes the containers, the network and the chains."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with open(tmp_path / "bench.log", "w") as log:
        bench = subprocess.Popen([sys.executable, "benchmarks/bench.py", "--quick", "--output", str(tmp_path / "bench.json")],
                                 cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        claims: dict[str, list[str]] = {}

        def claims_on_its_networks() -> bool:
            for network in engine.client.networks.list(filters={"label": STATE_DIR_LABEL}):
                state_dir = network.attrs["Labels"][STATE_DIR_LABEL]
                if state_dir.startswith(str(tmp_path) + "/"):
                    network.reload()
                    claims[state_dir] = list(network.attrs.get("Containers") or {})
            return any(claims.values())

        assert wait_for(claims_on_its_networks, 180, interval=0.5), (tmp_path / "bench.log").read_text()[-3000:]
        bench.send_signal(signal.SIGINT)
        assert bench.wait(120) == 130, (tmp_path / "bench.log").read_text()[-3000:]
    finally:
        if bench.poll() is None:
            bench.kill()
    assert not [network.name for network in engine.client.networks.list(filters={"label": STATE_DIR_LABEL})
                if network.attrs["Labels"][STATE_DIR_LABEL].startswith(str(tmp_path) + "/")]
    firewall = Firewall().read()
    assert not [chain for state_dir in claims for chain in IsolationPlan.of_state_dir(Path(state_dir)).rules.chain_rules()
                if firewall.has_chain(chain)]
    left = []
    for container_id in {container for ids in claims.values() for container in ids}:
        try:
            left.append(engine.client.containers.get(container_id).name)
        except docker.errors.NotFound:
            pass
    assert left == []
    assert "interrupted; cleaning up" in (tmp_path / "bench.log").read_text()
