"""The GPU inventory, run with the real nvidia-ml-py against the stand-in NVML library.

glibc reads LD_LIBRARY_PATH only when a process starts, so each NVML scenario runs the
inventory in a child Python (PROBE below) whose LD_LIBRARY_PATH starts with the stand-in, and
checks the JSON it prints. Scenarios are named as gpustat's tests name theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from tests.fake_nvml import (
    DEFAULT_TEST_GPUS,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    build_fake_nvml,
    fake_gpu,
    fake_gpus,
    fake_nvml_env,
    write_fake_nvml_config,
)

from utopia_agent.gpus.inventory import GpuInventory, GpuStatus, make_inventory

REPO_ROOT = Path(__file__).resolve().parents[1]
SINGLE, MULTIPLE, SYSTEM = 10, 20, 50

# Runs in the child: make an inventory, snapshot it (swapping in each later scenario file
# between snapshots), and print one JSON object.
PROBE = r"""
import json, logging, os, sys, threading
from dataclasses import asdict

args = json.loads(sys.argv[1])
warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())

logger = logging.getLogger("utopia_agent.gpus")
logger.addHandler(Collect())
logger.setLevel(logging.DEBUG)

if args.get("hide_library"):
    import pynvml
    def no_library(name, *rest, **kwargs):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    pynvml.CDLL = no_library

from utopia_agent.gpus.inventory import GpuBackendError, make_inventory

try:
    inventory = make_inventory(args["backend"], args.get("fake_gpu_count", 0))
except GpuBackendError as exc:
    print(json.dumps({"error": str(exc), "warnings": warnings}))
    sys.exit(0)

out = {"backend": inventory.backend, "snapshots": [[asdict(g) for g in inventory.snapshot()]]}
for later in args.get("then", []):
    os.replace(later, os.environ["FAKE_NVML_CONFIG"])
    out["snapshots"].append([asdict(g) for g in inventory.snapshot()])
n = len(out["snapshots"][0])
out["distance"] = [[inventory.distance(a, b) for b in range(n)] for a in range(n)]

if args.get("threads"):
    expected = inventory.snapshot()
    results = []
    def hammer():
        results.extend(inventory.snapshot() == expected for _ in range(25))
    workers = [threading.Thread(target=hammer) for _ in range(args["threads"])]
    for w in workers: w.start()
    for w in workers: w.join()
    out["threaded"] = {"snapshots": len(results), "all_equal": all(results)}

inventory.close()
inventory.close()
out["after_close"] = [asdict(g) for g in inventory.snapshot()]
out["warnings"] = warnings
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory) -> Path:
    """The stand-in libnvidia-ml.so.1, compiled once per test session."""
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture
def run_probe(fake_nvml_lib, tmp_path):
    """Run PROBE under a scenario: GPUs (or None for no library), later scenarios, options."""

    def run(gpus, *, backend="nvml", then=(), config=None, library=True, **options):
        config_path = write_fake_nvml_config(tmp_path / "nvml.conf", gpus, **(config or {}))
        later = [
            str(write_fake_nvml_config(tmp_path / f"nvml-{i}.conf", scenario))
            for i, scenario in enumerate(then)
        ]
        env = fake_nvml_env(fake_nvml_lib if library else None, config_path)
        env["PYTHONPATH"] = str(REPO_ROOT)
        args = {"backend": backend, "then": later, **options}
        done = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(args)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


def by_index(snapshot):
    return {gpu["index"]: gpu for gpu in snapshot}


def assert_healthy_h100(gpu, index):
    assert gpu == {
        "index": index,
        "uuid": f"GPU-00000000-0000-0000-0000-{index:012d}",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_mb": 81559,
        "memory_used_mb": 0,
        "temperature_c": 30 + index,
        "usage_percent": 0.0,
        "compute_processes": False,
        "healthy": True,
    }


def test_eight_healthy_gpus(run_probe):
    out = run_probe(fake_gpus(8))
    assert out["backend"] == "nvml"
    snapshot = out["snapshots"][0]
    assert [gpu["index"] for gpu in snapshot] == list(range(8))
    for index, gpu in enumerate(snapshot):
        assert_healthy_h100(gpu, index)
    assert out["warnings"] == []


def test_temperature_not_supported_is_null(run_probe):
    gpus = fake_gpus(8)
    gpus[3] = replace(gpus[3], temperature_c=None)
    gpu = by_index(run_probe(gpus)["snapshots"][0])[3]
    assert gpu["temperature_c"] is None
    assert gpu["healthy"] is True
    assert gpu["memory_used_mb"] == 0 and gpu["usage_percent"] == 0.0


def test_one_lost_gpu_among_eight(run_probe):
    gpus = fake_gpus(8)
    gpus[6] = replace(gpus[6], lost=True)
    snapshot = by_index(run_probe(gpus)["snapshots"][0])
    assert snapshot[6] == {
        "index": 6,
        "uuid": None,
        "name": None,
        "memory_total_mb": None,
        "memory_used_mb": None,
        "temperature_c": None,
        "usage_percent": None,
        "compute_processes": False,
        "healthy": False,
    }
    for index in (0, 1, 2, 3, 4, 5, 7):
        assert_healthy_h100(snapshot[index], index)


def test_default_test_gpus(run_probe):
    """The scenario the agent's integration tests use: GPU 3 without temperature, GPU 6 lost."""
    snapshot = by_index(run_probe(DEFAULT_TEST_GPUS)["snapshots"][0])
    assert len(snapshot) == 8
    assert [i for i, gpu in snapshot.items() if not gpu["healthy"]] == [6]
    assert [i for i, gpu in snapshot.items() if gpu["temperature_c"] is None] == [3, 6]


def test_gpu_lost_after_start_keeps_its_static_facts(run_probe):
    gpus = fake_gpus(4)
    lost = list(gpus)
    lost[2] = replace(gpus[2], lost=True)
    before, after = run_probe(gpus, then=[lost])["snapshots"]
    assert by_index(before)[2]["healthy"] is True
    gpu = by_index(after)[2]
    assert gpu["healthy"] is False
    assert gpu["uuid"] == "GPU-00000000-0000-0000-0000-000000000002"
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["memory_total_mb"] == 81559
    assert gpu["memory_used_mb"] is None and gpu["temperature_c"] is None
    assert gpu["usage_percent"] is None
    assert [g["healthy"] for g in after] == [True, True, False, True]


def test_changing_fields_are_read_each_snapshot_static_facts_once(run_probe):
    busy = fake_gpu(
        1,
        name="Renamed GPU",
        memory_used_mib=40000,
        temperature_c=77,
        utilization_percent=93,
        compute_processes=2,
    )
    before, after = run_probe(fake_gpus(2), then=[[fake_gpu(0), busy]])["snapshots"]
    assert_healthy_h100(by_index(before)[1], 1)
    gpu = by_index(after)[1]
    assert (gpu["memory_used_mb"], gpu["temperature_c"], gpu["usage_percent"]) == (40000, 77, 93.0)
    assert gpu["compute_processes"] is True
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"


def test_memory_v2_leaves_out_reserved_memory(run_probe):
    gpus = [fake_gpu(0, memory_used_mib=1000, memory_reserved_mib=500)]
    gpu = run_probe(gpus)["snapshots"][0][0]
    assert (gpu["memory_total_mb"], gpu["memory_used_mb"]) == (81559, 1000)


@pytest.mark.parametrize("v2_error", [NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH])
def test_memory_v1_fallback_when_driver_lacks_v2(run_probe, v2_error):
    gpus = [fake_gpu(0, memory_used_mib=1000, memory_reserved_mib=500), fake_gpu(1)]
    out = run_probe(gpus, then=[gpus], config={"memory_v2_error": v2_error})
    for snapshot in out["snapshots"]:
        assert [gpu["memory_used_mb"] for gpu in snapshot] == [1500, 0]
        assert all(gpu["healthy"] for gpu in snapshot)


def test_memory_not_supported_is_null(run_probe):
    gpu = run_probe([fake_gpu(0, memory_total_mib=None)])["snapshots"][0][0]
    assert gpu["memory_total_mb"] is None and gpu["memory_used_mb"] is None
    assert gpu["healthy"] is True


def test_utilization_and_processes_not_supported(run_probe):
    gpu = run_probe([fake_gpu(0, utilization_percent=None, compute_processes=None)])["snapshots"][0][0]
    assert gpu["usage_percent"] is None
    assert gpu["compute_processes"] is False
    assert gpu["healthy"] is True


def test_compute_processes_are_reported(run_probe):
    gpus = [fake_gpu(0), fake_gpu(1, compute_processes=3)]
    assert [gpu["compute_processes"] for gpu in run_probe(gpus)["snapshots"][0]] == [False, True]


def test_unreadable_uuid_is_unhealthy(run_probe):
    gpu = run_probe([fake_gpu(0, uuid=None)])["snapshots"][0][0]
    assert gpu["uuid"] is None
    assert gpu["healthy"] is False
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"


def test_topology_distance(run_probe):
    distance = run_probe(DEFAULT_TEST_GPUS)["distance"]
    near, far = [0, SINGLE, MULTIPLE, MULTIPLE], [SYSTEM] * 4
    assert distance[0] == near + far
    assert distance[4][5] == SINGLE and distance[5][7] == MULTIPLE and distance[3][7] == SYSTEM
    assert all(distance[a][b] == distance[b][a] for a in range(8) for b in range(8))
    # The lost GPU's links cannot be measured: as far away as NVML knows.
    assert all(distance[6][b] == SYSTEM for b in range(8) if b != 6)


def test_concurrent_snapshots(run_probe):
    out = run_probe(DEFAULT_TEST_GPUS, threads=8)
    assert out["threaded"] == {"snapshots": 200, "all_equal": True}


def test_close_is_idempotent_and_ends_snapshots(run_probe):
    assert run_probe(fake_gpus(2))["after_close"] == []


def test_nvml_backend_without_library_raises(run_probe):
    out = run_probe(fake_gpus(8), library=False, hide_library=True)
    assert "NVML Shared Library Not Found" in out["error"]


def test_nvml_backend_driver_not_loaded_raises(run_probe):
    out = run_probe(fake_gpus(8), config={"init_error": NVML_ERROR_DRIVER_NOT_LOADED})
    assert "Driver Not Loaded" in out["error"]


def test_auto_without_library_serves_no_gpus_and_logs_once(run_probe):
    out = run_probe(fake_gpus(8), backend="auto", library=False, hide_library=True)
    assert out["backend"] == "none"
    assert out["snapshots"] == [[]]
    assert len(out["warnings"]) == 1
    assert "NVML Shared Library Not Found" in out["warnings"][0]


def test_auto_with_library_uses_nvml(run_probe):
    out = run_probe(DEFAULT_TEST_GPUS, backend="auto")
    assert out["backend"] == "nvml"
    assert len(out["snapshots"][0]) == 8
    assert out["warnings"] == []


def test_fake_backend():
    inventory = make_inventory("fake", fake_gpu_count=3)
    snapshot = inventory.snapshot()
    assert inventory.backend == "fake"
    assert [gpu.index for gpu in snapshot] == [0, 1, 2]
    assert [gpu.uuid for gpu in snapshot] == [f"GPU-fake-0000-0000-0000-{i:012d}" for i in range(3)]
    assert all(isinstance(gpu, GpuStatus) and gpu.healthy for gpu in snapshot)
    assert inventory.snapshot() == snapshot
    assert inventory.distance(0, 1) == inventory.distance(0, 2) == inventory.distance(1, 2)
    assert inventory.distance(1, 1) < inventory.distance(0, 1)
    inventory.close()


def test_none_backend():
    inventory = make_inventory("none")
    assert isinstance(inventory, GpuInventory)
    assert inventory.backend == "none"
    assert inventory.snapshot() == []
    inventory.close()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown GPU backend"):
        make_inventory("cuda")
