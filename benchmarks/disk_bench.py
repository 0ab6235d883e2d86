"""The disk rows of `make bench` (`benchmarks/bench.py --only disks` runs them alone).

- A create with a disk size on a btrfs engine, against the engine's own create + start with the
  same `storage_opt` (the agent's own create arguments for the same claim).
- The agent's CPU in measured mode on the run's engine (overlay2 on ext4 here) with 50 claims each
  holding 10,000 files in its writable layer, over one whole backstop period of the sampler (every
  layer is walked at least once in it), `du` children included.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import psutil

from tests.support.agent import AgentProcess
from tests.support.engine import ensure_test_image, free_port
from tests.support.private_engine import PrivateEngine, running_btrfs_engine
from utopia_agent.allocation.policy import build_container_spec
from utopia_agent.claims.records import resources_from_labels
from utopia_agent.config import Config
from utopia_agent.disks.usage import BACKSTOP_SECONDS
from utopia_agent.engine.container_config import create_arguments

MEASURED_CLAIMS = 50
FILES_PER_CLAIM = 10_000
# 100 directories of 100 empty files, made with the shell's own redirection (no process per file).
MAKE_FILES = ("i=0; while [ $i -lt 100 ]; do mkdir -p /layer/$i; j=0; while [ $j -lt 100 ]; do : > /layer/$i/$j; j=$((j+1)); done; "
              "i=$((i+1)); done; : > /layer/ready; sleep 3600")


def btrfs_engine(subnet: str) -> tuple[PrivateEngine, Callable[[], None]]:
    """The tests' btrfs engine (tests/support/private_engine.py), and what tears it down."""
    stack = ExitStack()
    return stack.enter_context(running_btrfs_engine(subnet)), stack.close


def figure_btrfs_create(bench, say, compare, samples: int) -> None:
    """POST with disk_gb=1 through an agent in engine mode on the btrfs engine vs SDK create + start
    with the agent's own create arguments (storage_opt size included), interleaved; both removed each round."""
    if shutil.which("mkfs.btrfs") is None or os.geteuid() != 0:
        say("skipping the btrfs create: it needs root and btrfs-progs")
        return
    engine, teardown = btrfs_engine("10.223")
    agent = None
    try:
        state = bench.tmp / "btrfs-agent"
        state.mkdir()
        env = {**os.environ, "DOCKER_HOST": engine.base_url, "UTOPIA_AGENT_DISK_QUOTA": "engine", "UTOPIA_AGENT_GPU_BACKEND": "none",
               "UTOPIA_AGENT_NETWORK_ISOLATION": "off", "UTOPIA_AGENT_STOP_TIMEOUT": str(bench.stop_timeout)}
        agent = AgentProcess(state, free_port(), env, workers=4)
        agent.start()
        api, image = engine.client.api, ensure_test_image(engine.client)
        client = agent.new_client()
        defaults = Config(token="-", state_dir=state, network_isolation=False)
        probe = client.create(bench.claim("q"), image, command=["sleep", "3600"], disk_gb=1).container_id
        info = api.inspect_container(probe)
        client.delete(probe)
        resources = resources_from_labels(info["Config"]["Labels"])
        request = {"claim_id": "-", "image": image, "command": ["sleep", "3600"], "env_vars": [], "port_mappings": [], "volumes": {},
                   "working_dir": ""}
        spec = replace(build_container_spec(request, defaults), shm_size_mb=resources["shm_size_mb"], disk_gb=1.0, disk_quota="engine")
        times: dict[str, list[float]] = {"agent": [], "engine": []}
        for i in range(samples + 2):
            made: dict[str, str] = {}
            for who in (["agent", "engine"] if i % 2 == 0 else ["engine", "agent"]):
                start = time.perf_counter()
                if who == "agent":
                    made[who] = client.create(bench.claim("k"), image, command=["sleep", "3600"], disk_gb=1).container_id
                else:
                    created = api.create_container(**create_arguments(api, replace(spec, claim_id=bench.claim("j")), defaults))
                    api.start(created["Id"])
                    made[who] = created["Id"]
                times[who].append((time.perf_counter() - start) * 1000)
            for container_id in made.values():
                api.remove_container(container_id, v=True, force=True)
        for series in times.values():
            del series[:2]
        bench.add(compare("POST /api/v1/containers with disk_gb on a btrfs engine", times["agent"], times["engine"], 1.05,
                          f"baseline: SDK create + start with the agent's own create arguments (storage_opt size=1 GiB); "
                          f"{samples} rounds on a private dockerd over a loop-mounted btrfs")
                  .keep_samples(agent=times["agent"], engine_create_and_start=times["engine"]))
    finally:
        if agent is not None:
            agent.stop()
        teardown()


def figure_measured_cpu(bench, say, figure_class, seconds: float = BACKSTOP_SECONDS) -> None:
    """The agent's CPU in measured mode with MEASURED_CLAIMS claims of FILES_PER_CLAIM files each,
    over `seconds` (one backstop period: each layer is walked in it), children (`du`) included."""
    state = bench.tmp / "measured-agent"
    state.mkdir()
    # Fifty claims without GPUs on a 2-core machine: the default CPUs and memory of each (a quarter of the
    # node's capacity here) would let four start; they sit idle, so a hundredth of a CPU is theirs.
    env = {**os.environ, "UTOPIA_AGENT_DISK_QUOTA": "measured", "UTOPIA_AGENT_GPU_BACKEND": "none", "UTOPIA_AGENT_NETWORK_ISOLATION": "off",
           "UTOPIA_AGENT_STOP_TIMEOUT": str(bench.stop_timeout), "UTOPIA_AGENT_RESERVED_CPUS": "0",
           "UTOPIA_AGENT_DEFAULT_CPUS": "0.01", "UTOPIA_AGENT_DEFAULT_MEMORY_MB": "32"}
    agent = AgentProcess(state, free_port(), env, workers=4)
    agent.start()
    try:
        def create(_):
            with agent.new_client() as client:
                return client.create(bench.claim("m"), bench.image, command=["sh", "-c", MAKE_FILES], disk_gb=1).container_id
        with ThreadPoolExecutor(4) as pool:
            made = list(pool.map(create, range(MEASURED_CLAIMS)))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ready = sum(bench.api.inspect_container(c)["GraphDriver"]["Data"] is not None
                        and os.path.exists(Path(bench.api.inspect_container(c)["GraphDriver"]["Data"]["UpperDir"]) / "layer" / "ready")
                        for c in made)
            if ready == len(made):
                break
            time.sleep(2)
        say(f"{len(made)} claims hold {FILES_PER_CLAIM} files each; measuring the agent's CPU for {seconds:g} s")
        master = psutil.Process(agent.process.pid)
        procs = [master, *master.children()]

        def cpu_seconds() -> float:
            return sum(sum(p.cpu_times()) for p in procs)  # user, system and reaped children's (the walks)

        before, started, window_start = cpu_seconds(), time.monotonic(), time.time()
        time.sleep(seconds)
        percent = 100 * (cpu_seconds() - before) / (time.monotonic() - started)
        figures = json.loads((state / "disk-usage.json").read_text())["claims"]
        walked = sum(entry["walked_at"] >= window_start for entry in figures.values())
        bench.add(figure_class(
            figure=f"CPU of the agent in measured mode, {MEASURED_CLAIMS} claims of {FILES_PER_CLAIM} files each, {seconds:g} s",
            target="≤ 1% of a core", value=f"{percent:.2f}% of a core", met=percent <= 1.0,
            note=f"master + {len(procs) - 1} workers and their du children, not polled; "
                 + (f"one sampler backstop period ({BACKSTOP_SECONDS:g} s): every layer is walked once in it" if seconds >= BACKSTOP_SECONDS
                    else f"shorter than the sampler's backstop period ({BACKSTOP_SECONDS:g} s): walks may fall outside it")
                 + f"; {walked} of {len(figures)} measured layers walked in the window",
            extra={"agent_percent_of_core": round(percent, 3), "seconds": seconds, "layers_walked": walked, "claims": MEASURED_CLAIMS,
                   "files_per_claim": FILES_PER_CLAIM},
        ))
        for container_id in made:
            bench.api.remove_container(container_id, v=True, force=True)
    finally:
        agent.stop()
