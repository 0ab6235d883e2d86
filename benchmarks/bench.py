"""The agent against the engine's own calls, side by side, in one run (`make bench`).

Starts the agent as production does (gunicorn from gunicorn.conf.py, 4 workers) on the
stand-in NVML with 8 GPUs and the real engine, puts managed containers on the node, and
times each endpoint interleaved with the engine call it wraps (A, B, A, B, ...), so both
see the same machine noise. The floor of the stack is a bare app (benchmarks/bare_app.py)
under the same gunicorn config: what /health and GET one cost above it is the agent's own.
Reads are timed settled and on the first read after a change, with a keep-alive client and
with a fresh connection per request (which lands on any worker). Prints a markdown table and the machine it ran on, and writes
the figures as JSON. It asserts nothing: a missed target is reported, not raised.
Every container it makes carries a claim id with a prefix unique to the run and is
removed at the end, with its agents' claims networks and firewall chains, also on Ctrl-C,
SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, UTC
from pathlib import Path
from collections.abc import Callable

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_nvml import build_fake_nvml, fake_gpus, fake_nvml_env, write_fake_nvml_config  # noqa: E402
from tests.support.agent import AgentProcess, remove_agent_networks  # noqa: E402
from tests.support.certificates import KEY_RSA, Pki, tls_env  # noqa: E402
from tests.support.engine import (  # noqa: E402
    Registry,
    SlowRegistry,
    ensure_engine,
    ensure_test_image,
    free_port,
    make_unique_image,
    image_ids,
    remove_images,
    remove_new_dangling_images,
)
from benchmarks import disk_bench  # noqa: E402
from benchmarks import volume_bench  # noqa: E402
from utopia_agent.config import Config  # noqa: E402
from utopia_agent.engine.container_config import create_arguments  # noqa: E402
from utopia_agent.allocation.policy import build_container_spec  # noqa: E402
from utopia_agent.claims.records import PINNING_LABEL, ContainerSpec, resources_from_labels  # noqa: E402
from utopia_agent.claims.resources import parse_cpu_list  # noqa: E402

MANAGED_FILTER = {"label": "utopia.managed=true"}
WORKERS = 4
GPUS = 8
SLEEP = ["sleep", "3600"]
# The bench's own loopback registry user (the figure of a create that pulls with credentials).
BENCH_REGISTRY_PASSWORD = "bench-" + uuid.uuid4().hex
SCALING_TOLERANCE = 1.25  # "the ratio does not grow": ratio at N claims <= this x the ratio at the fewest


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does; --quick shrinks it to a smoke run."""

    claims: tuple[int, int, int]  # list scaling points; the middle one is the main figure's claim count
    samples: int  # list, inspect, metrics rounds
    scaling_samples: int  # rounds at the largest claim count
    create_samples: int  # create/delete rounds
    change_rounds: int  # changes per path in the "right after a change" figures
    health_samples: int  # /health at rest
    pulls: int
    pull_payload_kib: int
    pull_kib_per_s: int
    pull_window_s: float
    cpu_seconds: float
    burst_rounds: int  # rounds of 16 concurrent creates, each way
    pull_create_mib: int  # the image a create must pull, from a loopback registry with credentials
    pull_create_rounds: int  # pull + create rounds, each way
    private_samples: int  # creates of the cached private image (credential check) against the cached public one


FULL = Plan(claims=(10, 100, 500), samples=200, scaling_samples=60, create_samples=30, change_rounds=24, health_samples=400,
            pulls=8, pull_payload_kib=4096, pull_kib_per_s=256, pull_window_s=10.0, cpu_seconds=30.0, burst_rounds=6,
            pull_create_mib=300, pull_create_rounds=3, private_samples=20)
QUICK = Plan(claims=(5, 20, 40), samples=20, scaling_samples=10, create_samples=3, change_rounds=2, health_samples=60,
             pulls=8, pull_payload_kib=1024, pull_kib_per_s=128, pull_window_s=3.0, cpu_seconds=5.0, burst_rounds=1,
             pull_create_mib=24, pull_create_rounds=1, private_samples=3)
EVENT_EXITS = 20  # exits timed from the engine's die to the agent's stream
BURST = 8  # changes just before the "polled right after a burst" CPU figure
LIST_LIMIT = 0.5  # list at the main claim count, on every path, against the engine's list
FLOOR_LIMIT = 1.3  # /health and GET one, on every path, against the bare app
TLS_LIMIT = 1.15  # /health and GET one over HTTPS on a kept-alive connection, against plain HTTP
EXEC_LIMIT = 1.2  # one-shot `true` through the agent, against docker-py's exec_run
EXEC_THROUGHPUT_MIN = 0.5  # bytes per second through an interactive `cat`, against the engine's own exec stream
EXEC_BYTES = 100 * 1000 * 1000
EXEC_CHUNK = 64 * 1024


class ReleasableSlowRegistry(SlowRegistry):
    """SlowRegistry that can let its transfers go at full speed while it keeps serving.

    SlowRegistry.stop() releases and closes at once; a pull still waiting for the engine's
    download slot (max-concurrent-downloads is daemon-wide) would then meet a refused
    connection and retry for minutes.
    """

    def release(self) -> None:
        self._released.set()


class ForeignEvents:
    """Counts engine events of managed containers that are not this run's (other agents or test suites).

    Each one invalidates the agent's cached listing, so the count says how much the figures
    were disturbed by others sharing the engine.
    """

    def __init__(self, api, prefix: str):
        self.count = 0
        self._prefix = prefix
        self._stream = api.events(decode=True, filters={"type": ["container"], "label": [MANAGED_FILTER["label"]]})
        self._thread = threading.Thread(target=self._follow, name="foreign-events", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self._stream:
                claim = event.get("Actor", {}).get("Attributes", {}).get("utopia.claim_id", "")
                if not claim.startswith(self._prefix):
                    self.count += 1
        except Exception:  # the stream is closed at the end of the run
            pass

    def close(self) -> None:
        self._stream.close()


def engine_process() -> psutil.Process | None:
    """The dockerd serving DOCKER_HOST (the one on the default socket when it is unset), if it runs here."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    dockerds = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "dockerd"]
    for process in dockerds:
        hosts = [arg.split("=", 1)[1] for arg in process.info["cmdline"] or () if arg.startswith("--host=")]
        if host in hosts or (not hosts and host == "unix:///var/run/docker.sock"):
            return process
    return None


class BenchError(RuntimeError):
    """A call the benchmark depends on did not do what it must; the run stops and cleans up."""


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(samples_ms),
        "median_ms": round(statistics.median(samples_ms), 3),
        "p95_ms": round(percentile(samples_ms, 95), 3),
        "p99_ms": round(percentile(samples_ms, 99), 3),
        "min_ms": round(min(samples_ms), 3),
        "max_ms": round(max(samples_ms), 3),
    }


def timed(call: Callable[[], object]) -> float:
    """Milliseconds one call takes."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def interleave(calls: dict[str, Callable[[], object]], samples: int, warmup: int = 10) -> dict[str, list[float]]:
    """Time each call once per round, rotating which goes first, after a few untimed rounds."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    timings: dict[str, list[float]] = {name: [] for name in names}
    for i in range(samples):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(timed(calls[name]))
    return timings


@dataclass
class Figure:
    """One row of the table; `agent`/`baseline` are latency summaries, `value` any other measure."""

    figure: str
    target: str
    agent: dict | None = None
    baseline: dict | None = None
    ratio: float | None = None
    met: bool | None = None
    value: str | None = None
    tail: str = "p95"
    note: str = ""
    extra: dict = field(default_factory=dict)
    # Every timing of the figure's path, by series (the agent, its baseline, the bare stack), for the picture.
    samples: dict[str, list[float]] = field(default_factory=dict)

    def keep_samples(self, **series: list[float]) -> Figure:
        self.samples = {name.replace("_", " "): [round(ms, 3) for ms in values] for name, values in series.items()}
        return self


def seen_note(claims: int, timings: dict, note: str) -> str:
    """The note, saying so when others' managed containers were on the engine too."""
    if timings["seen"] == claims:
        return note
    return "; ".join(filter(None, [note, f"{timings['seen']} managed containers listed ({timings['seen'] - claims} not this run's)"]))


def compare(name: str, agent: list[float], baseline: list[float], limit: float | None, note: str = "") -> Figure:
    """A latency figure judged on the ratio of medians (the p95 ratio goes to the JSON)."""
    a, b = summary(agent), summary(baseline)
    ratio = a["median_ms"] / b["median_ms"]
    return Figure(
        figure=name, target=f"≤ {limit:g}×" if limit else "—", agent=a, baseline=b, ratio=round(ratio, 3),
        met=ratio <= limit if limit else None, note=note,
        extra={"p95_ratio": round(a["p95_ms"] / b["p95_ms"], 3), "limit": limit},
    )


# --------------------------------------------------------------------------- the agent over HTTP


def drain_quietly(response: requests.Response) -> None:
    """Read a stream until it is closed (by this process, from another thread)."""
    try:
        for _ in response.iter_lines():
            pass
    except Exception:  # closed under the reader
        pass


def expect(response: requests.Response, status: int) -> requests.Response:
    if response.status_code != status:
        raise BenchError(f"{response.request.method} {response.request.path_url} answered "
                         f"{response.status_code}, expected {status}: {response.text[:300]}")
    return response


class TimedCalls:
    """The agent calls the figures time, sent as they are on the project's client (its `send`):
    no retries and no schema loading, so a figure is the agent's latency and nothing of the client's.

    Two sessions: one keep-alive connection (one worker), and one whose every request asks
    for `Connection: close`, so the next opens a fresh connection (any worker).
    """

    def __init__(self, agent: AgentProcess):
        self.keepalive = agent.new_client()
        self.fresh = agent.new_client()

    def get(self, path: str, fresh: bool = False) -> requests.Response:
        if fresh:
            return expect(self.fresh.send("GET", path, headers={"Connection": "close"}), 200)
        return expect(self.keepalive.send("GET", path), 200)

    def create(self, claim_id: str, image: str, gpu_count: int, **fields) -> str:
        body = {"claim_id": claim_id, "image": image, "command": SLEEP, "gpu_count": gpu_count, **fields}
        return expect(self.keepalive.send("POST", "/api/v1/containers", json=body, timeout=300), 201).json()["container_id"]

    def delete(self, container_id: str) -> None:
        expect(self.keepalive.send("DELETE", f"/api/v1/containers/{container_id}"), 204)

    def warm_all_workers(self, path: str, rounds: int = 8 * WORKERS) -> None:
        """Fresh connections land on any worker: enough of them fill every worker's caches."""
        for _ in range(rounds):
            self.get(path, fresh=True)
        for _ in range(5):
            self.get(path)

    def close(self) -> None:
        self.keepalive.close()
        self.fresh.close()


# --------------------------------------------------------------------------- the run


class Bench:
    """The engine, the agent and what the run put on the node; `close()` removes all of it."""

    def __init__(self, plan: Plan, stop_timeout: int):
        self.plan = plan
        self.stop_timeout = stop_timeout
        self.run_id = uuid.uuid4().hex[:6]
        self.prefix = f"bench{self.run_id}"
        self.engine = ensure_engine()
        self.client = self.engine.client
        self.api = self.client.api
        self.images_before = image_ids(self.client)
        self.image = ensure_test_image(self.client)
        self.tmp = Path(tempfile.mkdtemp(prefix="utopia-bench-"))
        # The agent's own state dir: the baseline's containers join the agent's claims network.
        self.defaults = Config(token="-", state_dir=self.tmp / "agent")
        self.gpus = fake_gpus(GPUS)
        self.agent: AgentProcess | None = None
        self.http: TimedCalls | None = None
        self.bare: TimedCalls | None = None
        self._bare_process: AgentProcess | None = None
        self.registry: Registry | None = None
        self.slow: SlowRegistry | None = None
        self.images: list[str] = []
        self.figures: list[Figure] = []
        self.foreign = ForeignEvents(self.api, self.prefix)
        # Claims are named from many threads at once: next() on a count is atomic, `+= 1` is not.
        self._claim_numbers = itertools.count(1)
        self._foreign_seen = 0
        self._agent_specs: dict[int, ContainerSpec] = {}

    # --- setup and teardown ------------------------------------------------------------

    def start_agent(self) -> None:
        """gunicorn -c gunicorn.conf.py wsgi:app with 4 workers on the stand-in NVML (8 healthy GPUs)."""
        nvml_dir = build_fake_nvml(self.tmp / "nvml")
        state = self.tmp / "agent"
        state.mkdir()
        # The stand-in's event wait wakes on any change in its config's directory (real NVML blocks in
        # the driver): beside the agent's state, each sample written there would wake it.
        (self.tmp / "nvml-scenario").mkdir()
        nvml_config = write_fake_nvml_config(self.tmp / "nvml-scenario" / "nvml.conf", self.gpus)
        env = {
            **os.environ,
            "UTOPIA_AGENT_GPU_BACKEND": "nvml",
            "UTOPIA_AGENT_STOP_TIMEOUT": str(self.stop_timeout),
            # A hundred claims without GPUs beside GPU claims on a 2-core machine: each gets a
            # hundredth of a CPU by default, and no CPU is kept back, so they all fit.
            "UTOPIA_AGENT_RESERVED_CPUS": "0",
            "UTOPIA_AGENT_DEFAULT_CPUS": "0.01",
            "UTOPIA_AGENT_DEFAULT_MEMORY_MB": "32",
            # And a tenth of a GB of container disk, so a hundred of them leave GPU claims their share of the disk.
            "UTOPIA_AGENT_DEFAULT_DISK_GB": "0.1",
        }
        self.agent = AgentProcess(state, free_port(), fake_nvml_env(nvml_dir, nvml_config, env), workers=WORKERS)
        self.agent.start()
        self.http = TimedCalls(self.agent)

    def bare_floor(self) -> requests.Response:
        """GET /health of the bare app on its keep-alive connection: what any request through gunicorn costs."""
        return self.bare.get("/health")

    def start_bare_app(self) -> None:
        """The floor: benchmarks/bare_app.py under the same gunicorn.conf.py (workers, gthread, threads, keep-alive)."""
        state = self.tmp / "bare"
        state.mkdir()
        self._bare_process = AgentProcess(state, free_port(), dict(os.environ), workers=WORKERS, app="benchmarks.bare_app:app")
        self._bare_process.start(ready_path="/health")
        self.bare = TimedCalls(self._bare_process)

    def close(self) -> None:
        """Release pulls, stop the agents and registries, remove this run's containers and images, and
        the claims networks and firewall chains of its agents (one stopped while claims run keeps them,
        as it must in production), as the tests sweep theirs."""
        if self.slow is not None:
            self.slow.stop()
        if self.http is not None:
            self.http.close()
        if self.agent is not None:
            self.agent.stop()
        if self._bare_process is not None:
            self._bare_process.stop()
        if self.registry is not None:
            self.registry.stop()
        mine = [c["Id"] for c in self.api.containers(all=True, filters=MANAGED_FILTER)
                if (c.get("Labels") or {}).get("utopia.claim_id", "").startswith(self.prefix)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda cid: self.api.remove_container(cid, v=True, force=True), mine))
        remove_images(self.client, self.images)
        remove_new_dangling_images(self.client, self.images_before)
        remove_agent_networks(self.client, self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.foreign.close()
        self.engine.stop()

    # --- containers --------------------------------------------------------------------

    def claim(self, kind: str) -> str:
        return f"{self.prefix}-{kind}{next(self._claim_numbers):04d}"

    def add_running_claims(self, count: int) -> None:
        """Running claims made through the agent (4 at a time), as an orchestrator would."""
        def create(_):
            with self.agent.new_client() as client:
                return client.create(self.claim("r"), self.image, command=SLEEP).container_id
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(count)))

    def add_created_claims(self, count: int) -> None:
        """Managed containers made directly with the SDK and never started (cheap, so 500 fit)."""
        def create(_):
            claim = self.claim("s")
            labels = {"utopia.managed": "true", "utopia.claim_id": claim}
            self.api.create_container(self.image, SLEEP, labels=labels, name=f"utopia-{claim}")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, range(count)))

    def spec_the_agent_makes(self, gpu_count: int) -> ContainerSpec:
        """The spec the agent builds for a claim of `gpu_count` GPUs on this node, with the share of
        CPUs, memory and shm it gives (read back from one it made, then removed), so a baseline
        create asks the engine for the same limits: a memory and CPU limit alone cost the engine's
        create + start about 37 ms here."""
        if gpu_count not in self._agent_specs:
            container_id = self.http.create(self.claim("p"), self.image, gpu_count)
            info = self.api.inspect_container(container_id)
            self.http.delete(container_id)
            resources, host = resources_from_labels(info["Config"]["Labels"]), info["HostConfig"]
            request = {"claim_id": "-", "image": self.image, "command": SLEEP, "env_vars": [], "port_mappings": [], "volumes": {}, "working_dir": ""}
            self._agent_specs[gpu_count] = replace(
                build_container_spec(request, self.defaults),
                cpus=resources["cpus"], memory_mb=resources["memory_mb"], shm_size_mb=resources["shm_size_mb"],
                cpuset=parse_cpu_list(host.get("CpusetCpus") or ""), memory_nodes=parse_cpu_list(host.get("CpusetMems") or ""),
                cpu_pinning=info["Config"]["Labels"].get(PINNING_LABEL, ""),
            )
        return self._agent_specs[gpu_count]

    def raw_create_start(self, gpu_index: int | None, image: str | None = None) -> str:
        """What POST does, minus the agent: one create with the agent's own create arguments for the
        same claim (labels, limits, hardening; see spec_the_agent_makes) and one start."""
        spec = replace(self.spec_the_agent_makes(1 if gpu_index is not None else 0), claim_id=self.claim("b"), image=image or self.image)
        if gpu_index is not None:
            spec = replace(spec, gpu_ids=(gpu_index,), gpu_uuids=(self.gpus[gpu_index].uuid,))
        created = self.api.create_container(**create_arguments(self.api, spec, self.defaults))
        self.api.start(created["Id"])
        return created["Id"]

    def raw_create(self, spec: ContainerSpec) -> str:
        """One create and one start of `spec` with the agent's own create arguments."""
        created = self.api.create_container(**create_arguments(self.api, spec, self.defaults))
        self.api.start(created["Id"])
        return created["Id"]

    def raw_stop_remove(self, container_id: str) -> None:
        self.api.stop(container_id, timeout=self.stop_timeout)
        self.api.remove_container(container_id, v=True, force=True)

    # --- figures -----------------------------------------------------------------------

    def add(self, figure: Figure) -> None:
        """Keep a figure, with how many foreign managed-container events happened since the previous one."""
        figure.extra["foreign_events"] = self.foreign.count - self._foreign_seen
        self._foreign_seen = self.foreign.count
        self.figures.append(figure)

    def engine_list(self) -> list:
        return self.api.containers(all=True, filters=MANAGED_FILTER)

    def measure_list(self, samples: int, fresh: bool = False) -> tuple[list[float], list[float]]:
        """Interleaved agent list vs engine list; checks that both see the same containers."""
        self.http.warm_all_workers("/api/v1/containers")
        seen_agent = len(self.http.get("/api/v1/containers").json())
        seen_engine = len(self.engine_list())
        if seen_agent != seen_engine:
            raise BenchError(f"the agent lists {seen_agent} containers, the engine {seen_engine}")
        calls = {"agent": lambda: self.http.get("/api/v1/containers"), "engine": self.engine_list, "bare": self.bare_floor}
        if fresh:
            calls["agent_fresh"] = lambda: self.http.get("/api/v1/containers", fresh=True)
        timings = interleave(calls, samples)
        timings["seen"] = seen_engine
        return timings

    def figure_scaling(self, claims: int, timings: dict, note: str = "") -> None:
        """One point of the list-scaling figure; judged against the point with the fewest claims."""
        figure = compare(f"list time at {claims} claims", timings["agent"], timings["engine"], None, seen_note(claims, timings, note))
        figure.target = "ratio does not grow"
        figure.extra.update(claims=claims, claims_seen=timings["seen"])
        first = next((f for f in self.figures if f.figure.startswith("list time at")), None)
        if first is not None:
            limit = first.ratio * SCALING_TOLERANCE
            figure.met = figure.ratio <= limit
            figure.extra["limit"] = round(limit, 3)
            rule = f"met: ≤ {SCALING_TOLERANCE:g}× the ratio at {first.extra['claims']} claims"
            figure.note = "; ".join(filter(None, [figure.note, rule]))
        self.add(figure)

    def figure_list(self, claims: int, timings: dict) -> None:
        self.add(compare(f"GET /api/v1/containers ({claims} claims), settled", timings["agent"], timings["engine"], LIST_LIMIT,
                         seen_note(claims, timings, "keep-alive session; baseline: engine list with label utopia.managed=true"))
                 .keep_samples(agent=timings["agent"], agent_new_connection=timings["agent_fresh"],
                               engine_list=timings["engine"], bare_stack=timings["bare"]))
        self.add(compare(f"GET /api/v1/containers ({claims} claims), settled, fresh connection", timings["agent_fresh"],
                         timings["engine"], LIST_LIMIT, "a new TCP connection per request"))

    def figure_floor(self) -> None:
        """/health and GET one (settled) against the bare app, on both paths; the bare app against the engine's inspect."""
        container_id = self.engine_list()[0]["Id"]
        path = f"/api/v1/containers/{container_id}"
        self.http.warm_all_workers(path)
        self.http.warm_all_workers("/health")
        self.bare.warm_all_workers("/health")
        timings = interleave({
            "health": lambda: self.http.get("/health"),
            "health_fresh": lambda: self.http.get("/health", fresh=True),
            "show": lambda: self.http.get(path),
            "show_fresh": lambda: self.http.get(path, fresh=True),
            "bare": lambda: self.bare.get("/health"),
            "bare_fresh": lambda: self.bare.get("/health", fresh=True),
            "engine": lambda: self.api.inspect_container(container_id),
        }, self.plan.samples)
        floor = "baseline: the bare app (benchmarks/bare_app.py, same gunicorn config)"
        self.add(compare("GET /health", timings["health"], timings["bare"], FLOOR_LIMIT, f"keep-alive session; {floor}"))
        self.add(compare("GET /health, fresh connection", timings["health_fresh"], timings["bare_fresh"], FLOOR_LIMIT, floor))
        self.add(compare("GET /api/v1/containers/<id>, settled", timings["show"], timings["bare"], FLOOR_LIMIT, f"keep-alive session; {floor}")
                 .keep_samples(agent=timings["show"], agent_new_connection=timings["show_fresh"],
                               engine_inspect=timings["engine"], bare_stack=timings["bare"]))
        self.add(compare("GET /api/v1/containers/<id>, settled, fresh connection", timings["show_fresh"], timings["bare_fresh"], FLOOR_LIMIT, floor))
        self.add(compare("the bare app vs the engine's inspect", timings["bare"], timings["engine"], None,
                         "the floor itself: a keep-alive request to a gunicorn gthread app that does nothing"))
        self.add(compare("GET /api/v1/containers/<id>, settled, vs the engine's inspect", timings["show"], timings["engine"], None,
                         "for reference: the target is against the bare app"))

    def figure_tls(self) -> None:
        """/health and GET one over HTTPS against plain HTTP: the same build and configuration, an
        agent beside the first with an RSA-2048 certificate, interleaved. On a kept-alive connection
        the cost is the encryption's; on a fresh one each request also pays a full handshake."""
        pki = Pki.make(self.tmp / "tls", key=KEY_RSA)
        state = self.tmp / "agent-tls"
        state.mkdir()
        # Its own state dir, so its own claims network: a subnet of its own too.
        env = {key: value for key, value in self.agent.env.items() if key != "UTOPIA_AGENT_NETWORK_SUBNET"}
        https = AgentProcess(state, free_port(), {**env, **tls_env(pki.server)}, workers=WORKERS, ca_file=pki.ca_file)
        https.start()
        calls = TimedCalls(https)
        try:
            path = f"/api/v1/containers/{self.engine_list()[0]['Id']}"
            for timed_calls in (calls, self.http):
                timed_calls.warm_all_workers(path)
                timed_calls.warm_all_workers("/health")
            timings = interleave({
                "health": lambda: self.http.get("/health"),
                "health_tls": lambda: calls.get("/health"),
                "show": lambda: self.http.get(path),
                "show_tls": lambda: calls.get(path),
                "health_fresh": lambda: self.http.get("/health", fresh=True),
                "health_tls_fresh": lambda: calls.get("/health", fresh=True),
                "show_fresh": lambda: self.http.get(path, fresh=True),
                "show_tls_fresh": lambda: calls.get(path, fresh=True),
            }, self.plan.samples)
        finally:
            calls.close()
            https.stop()
        baseline = "baseline: the same agent over plain HTTP"
        self.add(compare("GET /health over HTTPS", timings["health_tls"], timings["health"], TLS_LIMIT, f"keep-alive session; {baseline}"))
        self.add(compare("GET /api/v1/containers/<id> over HTTPS, settled", timings["show_tls"], timings["show"], TLS_LIMIT,
                         f"keep-alive session; {baseline}"))
        for name, label in (("health", "GET /health"), ("show", "GET /api/v1/containers/<id>")):
            tls, plain = timings[f"{name}_tls_fresh"], timings[f"{name}_fresh"]
            handshake = statistics.median(tls) - statistics.median(plain)
            figure = compare(f"{label} over HTTPS, fresh connection", tls, plain, None,
                             f"{baseline}, fresh connection; the handshake (TLS 1.3, RSA 2048) adds {handshake:.2f} ms at the median")
            figure.extra["handshake_ms"] = round(handshake, 3)
            self.add(figure)

    def figure_after_change(self, claims: int) -> None:
        """List and show on the first read after a change, as an orchestrator reads: create or delete
        through its keep-alive session, then read at once (on that session, or on a fresh connection,
        which lands on any worker). The reads take turns, one per change; each is compared with the
        baselines timed in its own rounds, right after the same changes."""
        shown_id = self.engine_list()[-1]["Id"]
        show_path = f"/api/v1/containers/{shown_id}"
        reads = {
            "list": lambda: self.http.get("/api/v1/containers"),
            "list_fresh": lambda: self.http.get("/api/v1/containers", fresh=True),
            "show": lambda: self.http.get(show_path),
            "show_fresh": lambda: self.http.get(show_path, fresh=True),
        }
        baselines = {"engine": self.engine_list, "bare": lambda: self.bare.get("/health"),
                     "bare_fresh": lambda: self.bare.get("/health", fresh=True)}
        # For each read: its own timings and those of the baselines in the same rounds.
        timings = {read: {name: [] for name in [read, *baselines]} for read in reads}
        made: list[str] = []
        rounds = self.plan.change_rounds * len(reads)
        for i in range(rounds):
            if i % 2 == 0:
                made.append(self.http.create(self.claim("x"), self.image, 0))
            else:
                self.http.delete(made.pop())
            read = list(reads)[(i // 2) % len(reads)]
            # Which goes first turns once per cycle of changes, so the read and each of its baselines
            # come first after a create, and after a delete, equally often.
            order, shift = [read, *baselines], (i // (2 * len(reads))) % (1 + len(baselines))
            for name in order[shift:] + order[:shift]:
                timings[read][name].append(timed(reads.get(name) or baselines[name]))
        for container_id in made:
            self.http.delete(container_id)
        note = f"{rounds} changes, creates and deletes in turn; baselines timed right after the same changes as the read"
        self.add(compare(f"GET /api/v1/containers ({claims} claims), right after a change", timings["list"]["list"],
                         timings["list"]["engine"], LIST_LIMIT, f"keep-alive session that made the change; {note}"))
        self.add(compare(f"GET /api/v1/containers ({claims} claims), right after a change, fresh connection",
                         timings["list_fresh"]["list_fresh"], timings["list_fresh"]["engine"], LIST_LIMIT, note))
        self.add(compare("GET /api/v1/containers/<id>, right after a change", timings["show"]["show"], timings["show"]["bare"],
                         FLOOR_LIMIT, f"keep-alive session that made the change; baseline: the bare app; {note}"))
        self.add(compare("GET /api/v1/containers/<id>, right after a change, fresh connection", timings["show_fresh"]["show_fresh"],
                         timings["show_fresh"]["bare_fresh"], FLOOR_LIMIT, f"baseline: the bare app, fresh connection; {note}"))

    def figure_metrics(self) -> None:
        self.http.warm_all_workers("/api/v1/metrics")
        timings = interleave({
            "agent": lambda: self.http.get("/api/v1/metrics"),
            "health": lambda: self.http.get("/health"),
        }, self.plan.samples)
        gpus = len(self.http.get("/api/v1/metrics").json()["gpus"])
        self.add(compare(f"GET /api/v1/metrics, {gpus} GPUs", timings["agent"], timings["health"], 2,
                                    "baseline: GET /health on the same keep-alive session")
                 .keep_samples(agent=timings["agent"], bare_stack=timings["health"]))

    def figure_create_delete(self) -> None:
        """POST (image present, 1 GPU) vs raw create + start, then DELETE vs raw stop + remove, interleaved."""
        self.http.warm_all_workers("/api/v1/containers", rounds=2 * WORKERS)
        creates: dict[str, list[float]] = {"agent": [], "engine": []}
        deletes: dict[str, list[float]] = {"agent": [], "engine": []}
        bare: list[float] = []
        baseline_gpu = GPUS - 1  # the agent sees it held (labels) and picks another
        self.spec_the_agent_makes(1)
        for i in range(self.plan.create_samples + 2):
            made: dict[str, str] = {}
            order = ["agent", "engine"] if i % 2 == 0 else ["engine", "agent"]
            for who in order:
                start = time.perf_counter()
                made[who] = (self.http.create(self.claim("c"), self.image, 1) if who == "agent"
                             else self.raw_create_start(baseline_gpu))
                creates[who].append((time.perf_counter() - start) * 1000)
            for who in order:
                start = time.perf_counter()
                if who == "agent":
                    self.http.delete(made[who])
                else:
                    self.raw_stop_remove(made[who])
                deletes[who].append((time.perf_counter() - start) * 1000)
            bare.append(timed(self.bare_floor))
        for series in (*creates.values(), *deletes.values(), bare):
            del series[:2]  # the first two rounds are warm-up
        self.add(compare("POST /api/v1/containers, image present, 1 GPU", creates["agent"], creates["engine"], 1.05,
                                    "baseline: SDK create + start with the agent's own create arguments for the same claim "
                                    "(busybox sleep 3600, 1 GPU by DeviceRequest nvidia/UUID, the CPU, memory and shm share "
                                    "the agent gives a 1-GPU claim here)")
                 .keep_samples(agent=creates["agent"], engine_create_and_start=creates["engine"], bare_stack=bare))
        self.add(compare("DELETE /api/v1/containers/<id>", deletes["agent"], deletes["engine"], 1.05,
                                    f"baseline: SDK stop (timeout {self.stop_timeout} s) + remove; "
                                    f"agent UTOPIA_AGENT_STOP_TIMEOUT={self.stop_timeout}")
                 .keep_samples(agent=deletes["agent"], engine_stop_and_remove=deletes["engine"], bare_stack=bare))

    def figure_create_burst(self, count: int = 16) -> None:
        """`count` creates without GPUs at once, each on a connection of its own, against the engine
        doing the same `count` create + starts at once: the allocation lock must not serialise what
        need not be. Rounds alternate which goes first; each round's containers are removed after it."""
        agent_times: list[float] = []
        engine_times: list[float] = []

        def burst(make) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                made = list(pool.map(lambda _: make(), range(count)))
            elapsed = (time.perf_counter() - start) * 1000
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda container_id: self.api.remove_container(container_id, v=True, force=True), made))
            return elapsed

        def through_agent() -> str:
            with self.agent.new_client() as client:
                return client.create(self.claim("u"), self.image, command=SLEEP).container_id

        self.spec_the_agent_makes(0)
        for i in range(self.plan.burst_rounds):
            rounds = [(agent_times, through_agent), (engine_times, lambda: self.raw_create_start(None))]
            for times, make in (rounds if i % 2 == 0 else rounds[::-1]):
                times.append(burst(make))
        self.add(compare(f"{count} concurrent POSTs without GPUs, until all are answered", agent_times, engine_times, 1.3,
                         f"baseline: {count} concurrent SDK create + start with the agent's own create arguments; {self.plan.burst_rounds} rounds"))

    def agent_processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.agent.process.pid)
        return [master, *master.children()]

    def percent_of_core(self, during: Callable[[], None]) -> tuple[float, float, float | None]:
        """(agent % of a core, wall seconds, dockerd % of a core) while `during` runs: master + workers."""
        procs, dockerd = self.agent_processes(), engine_process()

        def cpu_seconds(ps) -> float:
            return sum(sum(p.cpu_times()[:2]) for p in ps)

        before, engine_before, started = cpu_seconds(procs), dockerd and cpu_seconds([dockerd]), time.monotonic()
        during()
        wall = time.monotonic() - started
        engine = 100 * (cpu_seconds([dockerd]) - engine_before) / wall if dockerd else None
        return 100 * (cpu_seconds(procs) - before) / wall, wall, engine

    def figure_cpu(self, seconds: float) -> None:
        """CPU of master + workers while an orchestrator polls metrics and the list once a second,
        at rest and right after a burst of changes (BURST creates through the agent at once).

        A third as long (at most 20 s) is first measured without polling: the agent's own idle cost.
        """
        procs = self.agent_processes()
        percent_of_core = self.percent_of_core

        def poll() -> None:
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                tick = time.monotonic()
                self.http.get("/api/v1/metrics")
                self.http.get("/api/v1/containers")
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

        def burst() -> list[str]:
            def create(_):
                with self.agent.new_client() as client:
                    return client.create(self.claim("u"), self.image, command=SLEEP).container_id
            with ThreadPoolExecutor(BURST) as pool:
                return list(pool.map(create, range(BURST)))

        idle_pct, idle_s, _ = percent_of_core(lambda: time.sleep(min(20.0, seconds / 3)))
        rest_pct, rest_s, rest_engine = percent_of_core(poll)
        made = burst()
        after_pct, after_s, after_engine = percent_of_core(poll)
        for container_id in made:
            self.http.delete(container_id)
        # After a burst the target leaves room below 1%, so the run-to-run noise cannot cross it.
        for name, pct, wall, engine, note, target in (
            ("at rest", rest_pct, rest_s, rest_engine, f"idle (no polling) {idle_pct:.2f}% over {idle_s:.0f} s", 1.0),
            (f"right after a burst of {BURST} creates", after_pct, after_s, after_engine, "measured from the last 201 on", 0.8),
        ):
            self.add(Figure(
                figure=f"CPU of the agent, polled once a second (metrics + list) for {seconds:g} s, {name}",
                target=f"≤ {target:g}% of a core", value=f"{pct:.2f}% of a core", met=pct <= target,
                note=f"master + {len(procs) - 1} workers; {note}"
                     + (f"; dockerd meanwhile {engine:.2f}% of a core" if engine is not None else ""),
                extra={"agent_percent_of_core": round(pct, 3), "idle_percent_of_core": round(idle_pct, 3),
                       "dockerd_percent_of_core": engine and round(engine, 3), "seconds": round(wall, 1)},
            ))

    def figure_events(self, exits: int, seconds: float) -> None:
        """From the engine's own `die` to the `exited` line on the agent's stream, and the CPU of 16 idle streams.

        Both streams are read here, on threads, and each line's arrival taken on this process's
        clock: the latency is what an orchestrator watching the agent sees beyond watching the engine."""
        engine_dies: dict[str, float] = {}
        agent_exits: dict[str, float] = {}
        arrived = threading.Condition()
        engine_stream = self.api.events(decode=True, filters={"type": ["container"], "event": ["die"], "label": [MANAGED_FILTER["label"]]})
        agent_stream = self.agent.get("/api/v1/events", stream=True, timeout=(10, None))
        expect(agent_stream, 200)

        def follow_engine() -> None:
            try:
                for event in engine_stream:
                    with arrived:
                        engine_dies[event.get("id", "")] = time.monotonic()
                        arrived.notify_all()
            except Exception:  # closed at the end of the figure
                pass

        def follow_agent() -> None:
            try:
                for line in agent_stream.iter_lines():
                    change = json.loads(line) if line else {}
                    if change.get("action") == "exited":
                        with arrived:
                            agent_exits[change["object"]["id"]] = time.monotonic()
                            arrived.notify_all()
            except Exception:  # closed at the end of the figure
                pass

        readers = [threading.Thread(target=follow, daemon=True) for follow in (follow_engine, follow_agent)]
        for reader in readers:
            reader.start()
        body = {"image": self.image, "command": SLEEP, "restart_policy": "no"}  # killed, it stays exited
        made = [expect(self.http.keepalive.send("POST", "/api/v1/containers", json={**body, "claim_id": self.claim("e")}), 201).json()["container_id"]
                for _ in range(exits)]
        latencies = []
        try:
            for container_id in made:
                self.api.kill(container_id)
                with arrived:
                    if not arrived.wait_for(lambda cid=container_id: cid in engine_dies and cid in agent_exits, timeout=30):
                        raise BenchError(f"no die or no exited line for {container_id[:12]} within 30 s")
                latencies.append(1000 * (agent_exits[container_id] - engine_dies[container_id]))
        finally:
            engine_stream.close()
            agent_stream.close()
            for container_id in made:
                self.http.delete(container_id)
        median, p99 = percentile(latencies, 50), percentile(latencies, 99)
        self.add(Figure(
            figure=f"Engine `die` to the `exited` line on the agent's event stream, {exits} exits",
            target="median ≤ 50 ms, p99 ≤ 250 ms", value=f"median {median:.1f} ms, p99 {p99:.1f} ms", met=median <= 50 and p99 <= 250,
            note="both streams read by the bench; each exit a `docker kill` of a running claim",
            extra={"median_ms": round(median, 2), "p99_ms": round(p99, 2)},
        ).keep_samples(agent=latencies))

        streams = [self.agent.get("/api/v1/events", stream=True, timeout=(10, None)) for _ in range(16)]
        drains = [threading.Thread(target=drain_quietly, args=(response,), daemon=True) for response in streams]
        for drain in drains:
            drain.start()
        try:
            for response in streams:
                expect(response, 200)
            pct, wall, _ = self.percent_of_core(lambda: time.sleep(seconds))
        finally:
            for response in streams:
                response.close()
        self.add(Figure(
            figure=f"CPU of the agent with 16 idle event streams open for {seconds:g} s",
            target="≤ 1% of a core", value=f"{pct:.2f}% of a core", met=pct <= 1.0,
            note="master + workers; heartbeats at the default 15 s",
            extra={"agent_percent_of_core": round(pct, 3), "seconds": round(wall, 1)},
        ))

    def exec_boxes(self, count: int = 2) -> list[str]:
        """Claims for the exec rows, each with a CPU of its own (under the bench's default of a hundredth of one, every
        exec would crawl alike), or an equal share of what the node has left when the run's other claims hold more."""
        cpus: float = 1
        made: list[str] = []
        while len(made) < count:
            body = {"claim_id": self.claim("x"), "image": self.image, "command": SLEEP, "gpu_count": 0, "cpus": cpus}
            answer = self.http.keepalive.send("POST", "/api/v1/containers", json=body, timeout=300)
            if answer.status_code == 409 and answer.json().get("error") == "not_enough_resources" and not made:
                cpus = math.floor(answer.json()["free_cpus"] * 100 / count) / 100
                continue
            made.append(expect(answer, 201).json()["container_id"])
        return made

    def figure_exec(self, seconds: float) -> None:
        """One-shot `true` through the agent against docker-py's exec_run of the same; 100 MB through an interactive
        `cat` against the engine's own exec stream (both fed and drained by this process); 16 idle sessions' CPU."""
        boxes = self.exec_boxes()
        box = self.client.containers.get(boxes[0])
        path = f"/api/v1/containers/{boxes[0]}/exec"
        timings = interleave({
            "agent": lambda: expect(self.http.keepalive.send("POST", path, json={"command": ["true"]}), 200),
            "engine": lambda: box.exec_run(["true"]),
        }, min(self.plan.samples, 100))
        self.add(compare("POST /exec `true` (one-shot)", timings["agent"], timings["engine"], EXEC_LIMIT,
                         note="baseline: docker-py's exec_run of the same command (create, start, read, inspect)")
                 .keep_samples(agent=timings["agent"], engine_exec_run=timings["engine"]))

        agent_rate = self._through_agent(boxes[0])
        engine_rate = self._through_engine(boxes[0])
        ratio = agent_rate / engine_rate
        self.add(Figure(
            figure=f"{EXEC_BYTES // 10**6} MB through an interactive `cat` (WebSocket, v5)", target=f"≥ {EXEC_THROUGHPUT_MIN:.0%} of the engine's",
            value=f"{agent_rate / 1e6:.0f} MB/s", ratio=round(ratio, 3), met=ratio >= EXEC_THROUGHPUT_MIN,
            note=f"the engine's own exec stream (hijacked connection) {engine_rate / 1e6:.0f} MB/s; {EXEC_CHUNK // 1024} KiB writes, "
                 "fed and read by the bench on two threads each way",
            extra={"agent_bytes_per_s": round(agent_rate), "engine_bytes_per_s": round(engine_rate)},
        ))

        with self.agent.new_client() as client:
            sessions = [client.exec_session(boxes[i // 8], ["cat"], stdin=True) for i in range(16)]
            try:
                pct, wall, _ = self.percent_of_core(lambda: time.sleep(seconds))
            finally:
                for session in sessions:
                    session.close()
        self.add(Figure(
            figure=f"CPU of the agent with 16 idle exec sessions for {seconds:g} s", target="≤ 1% of a core",
            value=f"{pct:.2f}% of a core", met=pct <= 1.0, note="16 interactive `cat` sessions waiting on stdin; master + workers",
            extra={"agent_percent_of_core": round(pct, 3), "seconds": round(wall, 1)},
        ))
        for container_id in boxes:
            self.http.delete(container_id)

    def _through_agent(self, container_id: str) -> float:
        """Bytes per second of EXEC_BYTES written to an interactive `cat` through the agent and read back."""
        chunk = b"x" * EXEC_CHUNK
        with self.agent.new_client() as client, client.exec_session(container_id, ["cat"], stdin=True) as session:
            def feed() -> None:
                for _ in range(EXEC_BYTES // EXEC_CHUNK):
                    session.write(chunk)
                session.close_stdin()

            started = time.perf_counter()
            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
            received = 0
            while (piece := session.read(timeout=60)) is not None:
                received += len(piece[1])
            elapsed = time.perf_counter() - started
            writer.join()
        if received != EXEC_BYTES // EXEC_CHUNK * EXEC_CHUNK:
            raise BenchError(f"cat through the agent gave back {received} bytes")
        return received / elapsed

    def _through_engine(self, container_id: str) -> float:
        """The same through the engine's own exec (docker-py's socket), its stream demultiplexed here."""
        exec_id = self.api.exec_create(container_id, ["cat"], stdin=True)["Id"]
        raw = self.api.exec_start(exec_id, socket=True)
        sock = getattr(raw, "_sock", raw)
        sock.settimeout(60)
        chunk = b"x" * EXEC_CHUNK

        def feed() -> None:
            for _ in range(EXEC_BYTES // EXEC_CHUNK):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        started = time.perf_counter()
        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        buffered, received = b"", 0
        while data := sock.recv(256 * 1024):
            buffered += data
            while len(buffered) >= 8 and len(buffered) >= 8 + int.from_bytes(buffered[4:8], "big"):
                size = int.from_bytes(buffered[4:8], "big")
                received += size
                buffered = buffered[8 + size:]
        elapsed = time.perf_counter() - started
        writer.join()
        sock.close()
        if received != EXEC_BYTES // EXEC_CHUNK * EXEC_CHUNK:
            raise BenchError(f"cat through the engine gave back {received} bytes")
        return received / elapsed

    def figure_rss(self) -> None:
        workers = self.agent_processes()[1:]
        rss = [p.memory_info().rss / 2**20 for p in workers]
        uss = [p.memory_full_info().uss / 2**20 for p in workers]
        self.add(Figure(
            figure="RSS per worker after the run", target="≤ 60 MiB",
            value=f"max {max(rss):.1f} MiB ({', '.join(f'{r:.0f}' for r in rss)})", met=max(rss) <= 60,
            note=f"{len(workers)} workers; USS max {max(uss):.1f} MiB",
            extra={"rss_mib": [round(r, 1) for r in rss], "uss_mib": [round(u, 1) for u in uss]},
        ))

    # --- /health under slow pulls ------------------------------------------------------

    def prepare_slow_images(self) -> list[str]:
        """Distinct images pushed to a loopback registry and removed locally, served through a throttle."""
        plan = self.plan
        self.registry = Registry().start()
        self.slow = ReleasableSlowRegistry(self.registry, kib_per_s=plan.pull_kib_per_s).start()
        refs = []
        for i in range(plan.pulls):
            source = make_unique_image(self.client, f"utopia-bench/pull{i}:{self.run_id}", payload_kib=plan.pull_payload_kib)
            self.images.append(source)
            name = f"bench/pull{i}-{self.run_id}:1"
            self.registry.push(self.client, source, name)
            remove_images(self.client, [source])
            refs.append(self.slow.ref(name))
        self.images.extend(refs)
        return refs

    def health_samples(self, count: int | None = None, until: float | None = None) -> list[float]:
        """/health over a fresh connection each time, as a load balancer probes (any worker answers)."""
        samples = []
        while (count is not None and len(samples) < count) or (until is not None and time.monotonic() < until):
            samples.append(timed(lambda: self.http.get("/health", fresh=True)))
        return samples

    def figure_health_under_pulls(self) -> None:
        """/health p99 at rest, then while every pull is provably in flight (started before, finished after)."""
        plan = self.plan
        refs = self.prepare_slow_images()
        self.health_samples(30)
        at_rest = self.health_samples(plan.health_samples)
        log_start = len(self.agent.log())
        done_at: dict[str, float] = {}
        results: dict[str, object] = {}

        def pull_create(ref: str) -> None:
            try:
                with self.agent.new_client(create_timeout=300) as client:
                    results[ref] = client.create(self.claim("p"), ref, command=SLEEP).container_id
            except Exception as exc:  # reported below; the thread must not die silently
                results[ref] = exc
            done_at[ref] = time.monotonic()

        threads = [threading.Thread(target=pull_create, args=(ref,), daemon=True) for ref in refs]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(f"image pull started image={ref}" in self.agent.log()[log_start:] for ref in refs) < len(refs):
            if time.monotonic() > deadline or done_at:
                raise BenchError(f"the {len(refs)} pulls did not all start: {results}")
            time.sleep(0.1)
        time.sleep(0.5)
        window_start = time.monotonic()
        busy = self.health_samples(until=window_start + plan.pull_window_s)
        window_end = time.monotonic()
        in_flight = not any(t <= window_end for t in done_at.values())
        self.slow.release()
        for thread in threads:
            thread.join(120)
        self.slow.stop()
        failed = {ref: result for ref, result in results.items() if isinstance(result, Exception)}
        if failed:
            raise BenchError(f"pull-and-create failed: {failed}")
        for container_id in results.values():
            self.http.delete(container_id)
        a, b = summary(busy), summary(at_rest)
        ratio = a["p99_ms"] / b["p99_ms"]
        self.add(Figure(
            figure=f"/health p99 while {len(refs)} image pulls are in flight", target="≤ 3×, and under 1 s",
            agent=a, baseline=b, ratio=round(ratio, 3), tail="p99",
            met=in_flight and ratio <= 3 and a["p99_ms"] < 1000,
            note=(f"baseline: /health p99 at rest; fresh connection per probe; {len(refs)} distinct images of "
                  f"~{plan.pull_payload_kib // 1024 + 1} MiB at {plan.pull_kib_per_s} KiB/s each; sampled "
                  f"{window_end - window_start:.1f} s, "
                  + ("every pull started before and finished after the window" if in_flight
                     else "NOT VALID: a pull finished inside the window")),
            extra={"pulls_in_flight_whole_window": in_flight, "window_s": round(window_end - window_start, 2),
                   "limit": 3, "pull_seconds": sorted(round(t - window_start, 1) for t in done_at.values())},
        ).keep_samples(health_during_pulls=busy, bare_stack_at_rest=at_rest))

    # --- creates that pull, and the cached private image's credential check -------------

    def figure_pull_create(self) -> None:
        """A create whose image must be pulled (from a loopback registry that wants credentials)
        against the engine's pull with the same credentials + create + start, interleaved, the image
        removed after each; then creates of that image cached and private (the registry's manifest
        check) against creates of the public cached test image."""
        plan = self.plan
        registry = Registry(users={"bench": BENCH_REGISTRY_PASSWORD}).start()
        try:
            source = make_unique_image(self.client, f"utopia-bench/big:{self.run_id}", payload_kib=plan.pull_create_mib * 1024)
            self.images.append(source)
            ref = registry.push(self.client, source, f"bench/big-{self.run_id}:1")
            self.images.append(ref)
            remove_images(self.client, [source])
            auth = registry.credentials("bench")
            repository, tag = ref.rsplit(":", 1)
            times: dict[str, list[float]] = {"agent": [], "engine": []}
            for i in range(plan.pull_create_rounds):
                for who in (["agent", "engine"] if i % 2 == 0 else ["engine", "agent"]):
                    start = time.perf_counter()
                    if who == "agent":
                        made = self.http.create(self.claim("g"), ref, 0, registry_auth=auth)
                    else:
                        for event in self.api.pull(repository, tag, stream=True, decode=True, auth_config=auth):
                            if "error" in event:
                                raise BenchError(f"docker pull {ref}: {event['error']}")
                        made = self.raw_create_start(None, ref)
                    times[who].append((time.perf_counter() - start) * 1000)
                    self.api.remove_container(made, v=True, force=True)
                    remove_images(self.client, [ref])
            self.add(compare(f"POST /api/v1/containers, image pulled ({plan.pull_create_mib} MiB, private registry)", times["agent"],
                             times["engine"], 1.05, "baseline: SDK pull with the same credentials + create + start with the agent's "
                             "arguments; loopback registry with htpasswd; the image removed after each").keep_samples(
                             agent=times["agent"], engine_pull_create_and_start=times["engine"]))
            self.http.create(self.claim("g"), ref, 0, registry_auth=auth)  # cached and private from here on
            checked: dict[str, list[float]] = {"private": [], "public": []}
            for i in range(plan.private_samples + 2):
                for who in (["private", "public"] if i % 2 == 0 else ["public", "private"]):
                    start = time.perf_counter()
                    made = (self.http.create(self.claim("q"), ref, 0, registry_auth=auth) if who == "private"
                            else self.http.create(self.claim("q"), self.image, 0))
                    checked[who].append((time.perf_counter() - start) * 1000)
                    self.http.delete(made)
            for series in checked.values():
                del series[:2]
            self.add(compare("POST /api/v1/containers, cached private image (registry checks the credentials)", checked["private"],
                             checked["public"], None, "baseline: the agent's create of the cached public image; the difference is "
                             "the manifest check through the engine (GET /distribution/<name>/json)").keep_samples(
                             private=checked["private"], public=checked["public"]))
        finally:
            registry.stop()

    # --- the whole run -----------------------------------------------------------------

    def run(self, say: Callable[[str], None], only: str | None = None) -> None:
        few, main, many = self.plan.claims
        plan = self.plan
        if only == "disks":
            self.run_disks(say)
            return
        if only == "volumes":
            self.run_volumes(say)
            return
        if only == "exec":
            say("starting the agent (gunicorn, 4 workers, stand-in NVML with 8 GPUs)")
            self.start_agent()
            say(f"exec: one-shot `true`, {EXEC_BYTES // 10**6} MB through `cat`, 16 idle sessions for {plan.cpu_seconds:g} s")
            self.figure_exec(plan.cpu_seconds)
            return
        say("starting the agent (gunicorn, 4 workers, stand-in NVML with 8 GPUs) and the bare app")
        self.start_agent()
        self.start_bare_app()
        say(f"{few} running claims through the agent")
        self.add_running_claims(few)
        self.figure_scaling(few, self.measure_list(plan.samples))
        say(f"{main} running claims through the agent")
        self.add_running_claims(main - few)
        timings = self.measure_list(plan.samples, fresh=True)
        self.figure_list(main, timings)
        self.figure_scaling(main, timings)
        say("/health and GET one against the bare app")
        self.figure_floor()
        say("/health and GET one over HTTPS against plain HTTP")
        self.figure_tls()
        say(f"list and show right after a change, {plan.change_rounds * 4} changes")
        self.figure_after_change(main)
        say("metrics")
        self.figure_metrics()
        say(f"create and delete, {plan.create_samples} rounds")
        self.figure_create_delete()
        say(f"16 concurrent creates without GPUs, {plan.burst_rounds} rounds")
        self.figure_create_burst()
        say(f"CPU while polled once a second for {plan.cpu_seconds:g} s, at rest and after {BURST} creates")
        self.figure_cpu(plan.cpu_seconds)
        say(f"events: {EVENT_EXITS} exits from the engine's die to the agent's stream, and 16 idle streams for {plan.cpu_seconds:g} s")
        self.figure_events(EVENT_EXITS, plan.cpu_seconds)
        say(f"/health while {plan.pulls} image pulls are in flight")
        self.figure_health_under_pulls()
        say(f"a create that pulls {plan.pull_create_mib} MiB, and the cached private image's credential check")
        self.figure_pull_create()
        say(f"exec: one-shot `true`, {EXEC_BYTES // 10**6} MB through `cat`, 16 idle sessions for {plan.cpu_seconds:g} s")
        self.figure_exec(plan.cpu_seconds)
        say(f"{many - main} created (not started) claims through the SDK")
        self.add_created_claims(many - main)
        self.figure_scaling(many, self.measure_list(plan.scaling_samples),
                            note=f"{many - main} of them created, never started (made with the SDK)")
        self.figure_rss()
        if only == "core":
            return
        self.run_volumes(say)
        self.run_disks(say)

    def run_disks(self, say: Callable[[str], None]) -> None:
        """The disk rows (benchmarks/disk_bench.py), each with an agent of its own; `--only disks` runs just these."""
        say(f"a create with a disk size on a btrfs engine against the engine's create + start, {self.plan.create_samples} rounds")
        disk_bench.figure_btrfs_create(self, say, compare, self.plan.create_samples)
        seconds = disk_bench.BACKSTOP_SECONDS if self.plan is FULL else self.plan.cpu_seconds
        say(f"measured mode: {disk_bench.MEASURED_CLAIMS} claims of {disk_bench.FILES_PER_CLAIM} files, CPU over {seconds:g} s")
        disk_bench.figure_measured_cpu(self, say, Figure, seconds)

    def run_volumes(self, say: Callable[[str], None]) -> None:
        """The claim volume rows (benchmarks/volume_bench.py); `--only volumes` runs just these, on an agent of their own."""
        if self.agent is None:
            self.start_agent()
        say(f"claim volumes: a {volume_bench.VOLUME_GB} GiB volume against the same by hand, {self.plan.create_samples} rounds")
        volume_bench.figure_volume_create(self, say, compare, self.plan.create_samples)
        say(f"a create mounting a claim volume against the engine's create + start with the same bind, {self.plan.create_samples} rounds")
        volume_bench.figure_mount_create(self, say, compare, self.plan.create_samples)


# --------------------------------------------------------------------------- output


def machine(bench: Bench) -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "unknown")
    version = bench.client.version()
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "engine_version": version.get("Version"),
        "engine_api": version.get("ApiVersion"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def cell(summary_: dict | None, tail: str) -> str:
    if summary_ is None:
        return "—"
    return f"{summary_['median_ms']:.1f} / {summary_[tail + '_ms']:.1f} ms"


def table(figures: list[Figure]) -> str:
    lines = [
        "| figure | agent median / tail | baseline median / tail | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        name = f.figure + (" (median / p99)" if f.tail == "p99" else "")
        agent = f.value or cell(f.agent, f.tail)
        # Three decimals where two would show a missed ratio equal to its limit.
        digits = 3 if f.ratio is not None and round(f.ratio, 2) == f.extra.get("limit") else 2
        ratio = f"{f.ratio:.{digits}f}×" if f.ratio is not None else "—"
        met = "—" if f.met is None else "yes" if f.met else "**no**"
        lines.append(f"| {name} | {agent} | {cell(f.baseline, f.tail)} | {ratio} | {f.target} | {met} |")
    return "\n".join(lines)


def report(bench: Bench, info: dict, output: Path, seconds: float, quick: bool) -> None:
    figures = bench.figures
    print()
    print(table(figures))
    print()
    print("Tail is p95 unless the figure says p99; ratio = agent median / baseline median "
          "(p99 / p99 for the /health-under-pulls figure).")
    for f in figures:
        foreign = f.extra.get("foreign_events")
        note = "; ".join(filter(None, [f.note, f"{foreign} engine events of others' managed containers meanwhile" if foreign else ""]))
        if note:
            print(f"- {f.figure}: {note}")
    print()
    print(f"Machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB; Docker engine "
          f"{info['engine_version']} (API {info['engine_api']}); Linux {info['kernel']}; Python {info['python']}; "
          f"load average {info['load_average_at_start'][0]} at start, {info['load_average_at_end'][0]} at end; "
          f"run took {seconds:.0f} s{' (--quick)' if quick else ''}; "
          f"{bench.foreign.count} engine events of managed containers not made by this run (other agents or tests).")
    output.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": info,
        "plan": asdict(bench.plan),
        "stop_timeout_s": bench.stop_timeout,
        "foreign_events": bench.foreign.count,
        "figures": [asdict(f) for f in figures],
    }
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"JSON: {shown_path(output)}")
    print(f"PNG: {shown_path(draw(results, output.with_suffix('.png')))}")


def shown_path(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# Series whose name starts with one of these share its colour in every panel.
SERIES_COLOURS = {"agent": "#1f77b4", "engine": "#ff7f0e", "bare": "#7f7f7f", "health": "#1f77b4"}


def draw(results: dict, png: Path) -> Path:
    """One panel per timed path: each series' distribution (box: quartiles, whiskers: p5-p95, dots
    beyond), so where the agent sits between the engine's own call and the bare HTTP stack shows at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    panels = [f for f in results["figures"] if f.get("samples")]
    rows = [len(panel["samples"]) + 1 for panel in panels]  # a row per series, one for the title
    figure, axes = pyplot.subplots(len(panels), 1, figsize=(10, 0.8 + 0.42 * sum(rows)), squeeze=False,
                                   gridspec_kw={"height_ratios": rows})
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        names = list(panel["samples"])[::-1]  # the agent on top
        boxes = ax.boxplot([panel["samples"][name] for name in names], orientation="horizontal", whis=(5, 95), widths=0.6,
                           patch_artist=True, flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "black"})
        for box, name in zip(boxes["boxes"], names, strict=True):
            box.set_facecolor(next((c for key, c in SERIES_COLOURS.items() if name.startswith(key)), "#2ca02c"))
            box.set_alpha(0.75)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if str(f"{value:g}")[0] in "25" else ""))
        ax.grid(axis="x", which="both", alpha=0.3)
        ratio = f"; ratio {panel['ratio']:.2f}× (target {panel['target']})" if panel.get("ratio") is not None else ""
        ax.set_title(f"{panel['figure']}{ratio}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("milliseconds (log scale)")
    info = results["machine"]
    load = info.get("load_average_at_start", [None])[0], info.get("load_average_at_end", [None])[0]
    figure.suptitle(f"make bench{' --quick' if results.get('quick') else ''}, {results['when'][:10]}: {info['cpu_model']}, "
                    f"{info['cores']} cores, Docker {info['engine_version']}"
                    + (f"; load average {load[0]} at start, {load[1]} at end" if None not in load else ""), fontsize=9)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    pyplot.close(figure)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run with few samples and claims")
    parser.add_argument("--cpu-seconds", type=float, help="how long to poll for each CPU figure (default 30, 5 with --quick)")
    parser.add_argument("--stop-timeout", type=int, default=1,
                        help="grace seconds of DELETE (UTOPIA_AGENT_STOP_TIMEOUT) and of the baseline's stop (default 1)")
    parser.add_argument("--output", type=Path,
                        help="JSON file, the PNG beside it (default benchmarks/results/latest.json, quick.json with --quick)")
    parser.add_argument("--only", choices=("core", "exec", "disks", "volumes"),
                        help="only these figures, with the agent they need (a partial run; core: all but the disk and volume rows, "
                             "which need engines and filesystems of their own; disks: benchmarks/disk_bench.py, "
                             "volumes: benchmarks/volume_bench.py)")
    parser.add_argument("--draw", type=Path, metavar="JSON", help="only draw the PNG of an earlier run's JSON (beside it, or at --output)")
    args = parser.parse_args(argv)
    if args.draw:
        png = (args.output or args.draw).with_suffix(".png")
        print(f"PNG: {shown_path(draw(json.loads(args.draw.read_text()), png))}")
        return 0
    plan = QUICK if args.quick else FULL
    if args.cpu_seconds is not None:
        plan = Plan(**{**asdict(plan), "cpu_seconds": args.cpu_seconds})
    output = args.output or ROOT / "benchmarks" / "results" / ("quick.json" if args.quick else "latest.json")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    bench = Bench(plan, args.stop_timeout)
    info = machine(bench)
    say(f"run {bench.prefix}: claim ids start with {bench.prefix}-")
    try:
        bench.run(say, args.only)
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except Exception:
        if bench.agent is not None:
            print("--- last lines of the agent log ---\n" + "\n".join(bench.agent.log().splitlines()[-30:]), file=sys.stderr)
        raise
    finally:
        # A second Ctrl-C (or SIGTERM) must not cut the sweep short: it is what leaves nothing behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("removing this run's containers, images, networks and firewall chains, stopping the agents and registries")
        bench.close()
    report(bench, info, output, time.monotonic() - started, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
