"""One worker of the node reads NVML; the others serve its sample (no engine, no gunicorn: the
samplers of two workers are two GpuSampler objects on one state dir, the role an flock each)."""

from __future__ import annotations

import json
import threading

import pytest

from tests.support.polling import wait_for
from utopia_agent.gpu_sampler import SAMPLE_INTERVAL_SECONDS, GpuSampler
from utopia_agent.gpus import FakeGpuInventory
from utopia_agent.nvml_watchdog import NvmlWatchdog

NVML_TIMEOUT = 0.3


class CountingInventory(FakeGpuInventory):
    """Fake GPUs that count their snapshots and can be made to hang in one, as a wedged driver does."""

    def __init__(self, watchdog: NvmlWatchdog):
        super().__init__(2)
        self.watchdog = watchdog
        self.snapshots = 0
        self.answer = threading.Event()
        self.answer.set()

    def snapshot(self):
        with self.watchdog.watch("nvmlDeviceGetUtilizationRates"):
            self.answer.wait()
            self.snapshots += 1
            return super().snapshot()


@pytest.fixture
def workers(tmp_path):
    """Start samplers like workers do (one after the other), on one state dir; close them all after."""
    started: list[tuple[GpuSampler, CountingInventory]] = []

    def start() -> tuple[GpuSampler, CountingInventory]:
        watchdog = NvmlWatchdog(NVML_TIMEOUT)
        inventory = CountingInventory(watchdog)
        sampler = GpuSampler(lambda: inventory, watchdog, tmp_path).start(wait=5)
        started.append((sampler, inventory))
        return sampler, inventory

    yield start
    for sampler, inventory in started:
        inventory.answer.set()
        sampler.close()


def test_one_worker_reads_nvml_and_every_worker_serves_its_sample(workers):
    first, first_gpus = workers()
    second, second_gpus = workers()
    assert second.latest() is not None, "a worker starts serving once the node's first sample is there"
    assert wait_for(lambda: first_gpus.snapshots >= 3, 10)
    assert second_gpus.snapshots == 0, "the second worker never reads NVML while the first does"
    assert second.latest().gpus == first.latest().gpus and second.hung() is None
    assert abs(second.latest().taken_at - first.latest().taken_at) <= 2 * SAMPLE_INTERVAL_SECONDS
    assert second.for_allocation().gpus == first.for_allocation().gpus, "allocation decides on the node's sample in every worker"


def test_another_worker_takes_over_when_the_sampling_one_stops(workers):
    first, first_gpus = workers()
    second, second_gpus = workers()
    first.close()
    assert wait_for(lambda: second_gpus.snapshots >= 2, 5 * SAMPLE_INTERVAL_SECONDS)
    renewed = second.latest().taken_at
    assert wait_for(lambda: second.latest().taken_at > renewed, 5 * SAMPLE_INTERVAL_SECONDS)


def test_a_sample_left_by_an_earlier_run_of_the_agent_is_never_served(workers, tmp_path):
    first, _ = workers()
    left = json.loads((tmp_path / "gpu-sample.json").read_text())
    first.close()
    (tmp_path / "gpu-sample.json").write_text(json.dumps({**left, "agent": left["agent"] + 1}))
    worker, gpus = workers()
    assert gpus.snapshots >= 1 and worker.latest() is not None
    assert json.loads((tmp_path / "gpu-sample.json").read_text())["agent"] == left["agent"], "replaced by this run's"


def test_a_worker_that_does_not_sample_sees_nvml_hang_in_the_one_that_does(workers):
    first, first_gpus = workers()
    second, _ = workers()
    first_gpus.answer.clear()
    assert wait_for(lambda: first.hung() is not None, 5), "the sampling worker's own call is overdue"
    reason = wait_for(second.hung, 5 * SAMPLE_INTERVAL_SECONDS)
    assert reason and reason.startswith("NVML is hung: the node's GPU sample has not been renewed"), reason
    assert second.latest() == first.latest() is not None, "both serve the last good sample (the sampler is stuck)"
    first_gpus.answer.set()
    assert wait_for(lambda: first.hung() is None and second.hung() is None, 5 * SAMPLE_INTERVAL_SECONDS)
