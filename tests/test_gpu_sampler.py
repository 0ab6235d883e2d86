"""One worker of the node reads NVML; the others serve its sample (no engine, no gunicorn: the
samplers of two workers are two GpuSampler objects on one state dir, the role an flock each)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from tests.support.polling import wait_for
from utopia_agent.config import load_config
from utopia_agent.gpus.sampler import SAMPLE_INTERVAL_SECONDS, GpuSample, GpuSampler, SharedSample
from utopia_agent.node.state_dir import GPU_SAMPLE_FILE, hold_state_dir, release_state_dir, start_fresh
from utopia_agent.gpus.inventory import FakeGpuInventory, GpuCounters
from utopia_agent.node.role import NodeRole
from utopia_agent.gpus.watchdog import NvmlWatchdog

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


def test_a_sample_left_by_an_earlier_run_of_the_agent_is_removed_when_the_next_starts(workers, tmp_path):
    workers()[0].close()
    assert (tmp_path / GPU_SAMPLE_FILE).exists()
    config = load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path)})
    assert hold_state_dir(config)
    try:
        start_fresh(config)
    finally:
        release_state_dir(config)
    assert not (tmp_path / GPU_SAMPLE_FILE).exists(), "the master's start never lets a worker serve it"


def test_staleness_is_judged_on_the_monotonic_clock_not_the_wall_clock(workers, tmp_path):
    """This test holds the sampler role itself, so the worker only reads what the test writes."""
    first, _ = workers()
    left = GpuSample.from_json(json.loads((tmp_path / GPU_SAMPLE_FILE).read_text()))
    first.close()
    role = NodeRole(tmp_path / "gpu-sample.lock")
    assert role.take()
    try:
        shared = SharedSample(tmp_path / GPU_SAMPLE_FILE)
        reader, _ = workers()
        shared.write(replace(left, taken_at=time.time() - 86400, monotonic_at=time.monotonic()), {})
        assert wait_for(lambda: reader.latest() is not None and reader.latest().taken_at < time.time() - 3600, 5)
        assert reader.hung() is None, "a wall clock a day ahead of the sample is not a hang"
        shared.write(replace(left, taken_at=time.time(), monotonic_at=time.monotonic() - 3600), {})
        reason = wait_for(reader.hung, 5)
        assert reason and "has not been renewed" in reason, reason
    finally:
        role.release()


def test_a_sampler_whose_reads_keep_failing_says_nvml_is_hung(workers):
    sampler, gpus = workers()
    gpus.snapshot = lambda: 1 / 0  # a bug or a driver error that is not a hang: no new sample comes
    reason = wait_for(sampler.hung, 5 * SAMPLE_INTERVAL_SECONDS + NVML_TIMEOUT)
    assert reason and "has not been renewed" in reason, reason


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


def test_an_overdue_call_that_returns_is_logged_though_no_reader_asked(caplog):
    """With several workers the others may answer every /health: the worker whose call it was
    still tells the operator that NVML answered again, and a call in time says nothing."""
    watchdog = NvmlWatchdog(0.01)
    with caplog.at_level("WARNING", logger="utopia_agent.nvml"):
        with watchdog.watch("nvmlDeviceGetCount"):
            pass
        assert not caplog.records
        with watchdog.watch("nvmlDeviceGetUtilizationRates"):
            time.sleep(0.05)
    [record] = caplog.records
    assert record.getMessage().startswith("NVML answered again: nvmlDeviceGetUtilizationRates returned after ")


def test_a_sample_comes_back_from_its_file_as_it_was_written():
    """Every field of every GPU and of its counters, None included, survives the file each worker reads."""
    gpus = tuple(FakeGpuInventory(8).snapshot())
    counters = {0: GpuCounters(ecc_dbe_volatile=2, row_remap_pending=1), 7: GpuCounters()}
    sample = GpuSample(gpus, counters, {gpus[3].uuid: "compute processes"})
    assert GpuSample.from_json(json.loads(json.dumps(sample.to_json()))) == sample
