"""One agent per state dir: the gunicorn master holds it for its lifetime.

The hold is a flock on STATE_DIR/agent.lock, taken before anything else in the state dir is
touched, and the file names the holder (pid, bind, GPU backend). A second agent started on
the same state dir stops with one line naming the first, and never empties the first one's
metrics; the CLI reads the file to describe the agent that runs there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import Config, ConfigError

LOCK_NAME = "agent.lock"
METRICS_DIR = "prometheus"
# Notes that are logged once per agent, not once per worker: a worker that creates the
# file logs; the others find it. Emptied when the agent starts.
LOGGED_ONCE_DIR = "logged-once"
# The node's last GPU sample (gpus/sampler.py): one run's, never served to the next.
GPU_SAMPLE_FILE = "gpu-sample.json"

# State dirs this process holds, by path: gunicorn runs its config file again on HUP, in the
# same master, and that must neither fail on its own lock nor empty the metrics again.
_held: dict[Path, int] = {}


@dataclass(frozen=True)
class RunningAgent:
    """What the agent holding a state dir wrote about itself."""

    pid: int
    bind: str
    gpu_backend: str
    fake_gpu_count: int

    def describe(self) -> str:
        return f"pid {self.pid} on {self.bind}"


class StateDirInUse(Exception):
    """Another agent holds the state dir; the message names it and what to do."""

    def __init__(self, state_dir: Path, holder: RunningAgent | None):
        who = f"the agent with {holder.describe()}" if holder else "another agent"
        super().__init__(
            f"state dir {state_dir} is in use by {who}; stop it first, or give this one its own UTOPIA_AGENT_STATE_DIR"
        )
        self.holder = holder


def hold_state_dir(config: Config) -> bool:
    """Take the state dir for this process, or raise StateDirInUse naming its holder.

    True on a fresh start; False when this process holds it already (gunicorn reloading its
    config on HUP), so the caller resets the per-run files only once.
    """
    key = config.state_dir
    if key in _held:
        _write_record(_held[key], config)
        return False
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(config.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError("UTOPIA_AGENT_STATE_DIR", f"cannot write {config.state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUse(config.state_dir, running_agent(config.state_dir)) from None
    _write_record(fd, config)
    _held[key] = fd
    return True


def _write_record(fd: int, config: Config) -> None:
    record = (json.dumps(asdict(RunningAgent(os.getpid(), config.bind, config.gpu_backend, config.fake_gpu_count))) + "\n").encode()
    os.pwrite(fd, record, 0)  # over the old record, then cut to length: never empty, even on a full disk
    os.ftruncate(fd, len(record))


def forget_inherited_holds() -> None:
    """In a worker after the fork: close the copies of the master's lock, so only the master holds it."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def release_state_dir(config: Config) -> None:
    """On a clean stop: clear the record (so nobody reads a stale pid) and let the lock go."""
    fd = _held.pop(config.state_dir, None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def metrics_dir(config: Config) -> Path:
    """prometheus-client's multiprocess files: every worker's counters, summed by a scrape."""
    return config.state_dir / METRICS_DIR


def start_fresh(config: Config) -> None:
    """Empty what belongs to one run of the agent (the metrics files must start empty, and the GPU
    sample of an earlier run, perhaps of another boot, must never be served).
    Only the holder of the state dir may do this."""
    if config.state_dir not in _held:
        raise RuntimeError(f"start_fresh without holding {config.state_dir}")
    for per_run in (metrics_dir(config), config.state_dir / LOGGED_ONCE_DIR):
        shutil.rmtree(per_run, ignore_errors=True)
        per_run.mkdir(parents=True)
    (config.state_dir / GPU_SAMPLE_FILE).unlink(missing_ok=True)


def first_to_log(config: Config, note: str) -> bool:
    """True for the first process of this agent run to ask about `note`, so it alone logs it."""
    try:
        os.close(os.open(config.state_dir / LOGGED_ONCE_DIR / note, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no run dir (an app built outside gunicorn): log rather than stay silent
    return True


def running_agent(state_dir: Path) -> RunningAgent | None:
    """The agent that holds `state_dir`, from its lock file; None when none runs there."""
    try:
        record = json.loads((state_dir / LOCK_NAME).read_text())
        holder = RunningAgent(**record)
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return holder
