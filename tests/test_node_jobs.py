"""The node's jobs that one worker does for all (node/chore.py), in real processes holding real flocks:
one process does the job, the others sleep until it dies, and one of them then carries on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.polling import wait_for

ROOT = Path(__file__).resolve().parent.parent

# A worker stand-in: runs one job on `state` and appends "<pid> <what>" to `state/done` each round.
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from utopia_agent.node.chore import NodeChore, NodeSampler
    import logging
    kind, state = sys.argv[1], Path(sys.argv[2])

    def note(what):
        with open(state / "done", "a") as out:
            out.write(f"{os.getpid()} {what}\\n")

    class Sampler(NodeSampler):
        def _sample_round(self):
            note("sample")

    if kind == "chore":
        NodeChore("test-chore", state / "test-chore.stamp", 0.4, lambda: note("chore"), at_start=True).start()
    else:
        Sampler("test-sampler", state, 0.1, logging.getLogger("test"), "not sampled: %s").start()
    note("started")
    time.sleep(120)
""")


@pytest.fixture
def workers(tmp_path):
    """Start stand-in workers of one node; each is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(kind: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", WORKER, kind, str(tmp_path)], cwd=ROOT)
        started.append(process)
        assert wait_for(lambda: f"{process.pid} started" in done(tmp_path), 10)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def done(state: Path) -> str:
    try:
        return (state / "done").read_text()
    except FileNotFoundError:
        return ""


def rounds(state: Path, pid: int, what: str) -> int:
    return done(state).count(f"{pid} {what}\n")


@pytest.mark.parametrize("kind, what", [("chore", "chore"), ("sampler", "sample")])
def test_one_worker_does_the_job_and_another_carries_on_when_it_dies(workers, tmp_path, kind, what):
    first = workers(kind)
    assert wait_for(lambda: rounds(tmp_path, first.pid, what) >= 2, 10)
    second = workers(kind)
    worked_before = rounds(tmp_path, first.pid, what)
    assert wait_for(lambda: rounds(tmp_path, first.pid, what) >= worked_before + 3, 10)
    assert rounds(tmp_path, second.pid, what) == 0, "a worker without the role does not do the job, nor wake for it"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert wait_for(lambda: rounds(tmp_path, second.pid, what) >= 2, 10), done(tmp_path)


def test_a_stamp_from_the_future_counts_as_just_renewed(workers, tmp_path):
    """The wall clock stepped back: the chore waits one interval, where waiting for the stamp's time would stop it for a day."""
    stamp = tmp_path / "test-chore.stamp"
    stamp.touch()
    future = time.time() + 86400
    os.utime(stamp, (future, future))
    worker = workers("chore")
    assert wait_for(lambda: rounds(tmp_path, worker.pid, "chore") >= 1, 10), done(tmp_path)
