"""gunicorn settings for the agent; numbers come from the environment (UTOPIA_AGENT_*).

Configuration is checked here, in the master, so a bad variable stops the agent before any
worker starts, with one line that names it. The master then holds the state dir for its
lifetime: a second agent on the same state dir stops here, before it touches anything there.
"""

import ctypes
import logging
import os
import signal
import sys

from gunicorn.glogging import Logger

from utopia_agent.config import MAX_EXEC_SESSIONS, ConfigError, load_config, prepare_state_dir
from utopia_agent.volumes.store import VolumeStore
from utopia_agent.observability.logs import logging_dict
from utopia_agent.claims.volumes import MountPins
from utopia_agent.disks.node_disk import quota_in_force
from utopia_agent.disks.quota import EngineCannotEnforce
from utopia_agent.engine.connection import EngineConnection
from utopia_agent.engine.manager import read_storage
from utopia_agent.errors import AgentError
from utopia_agent.network.isolation import IsolationFailed, NetworkIsolation
from utopia_agent.server.tls_reload import ServedCertificate, note_served_certificate
from utopia_agent.events.stream import MAX_STREAMS
from utopia_agent.node.state_dir import (
    StateDirInUse,
    forget_inherited_holds,
    hold_state_dir,
    metrics_dir,
    release_state_dir,
    start_fresh,
)

try:
    _agent = load_config()
    # HTTPS: the pair in service, loaded here so a bad one stops the agent before any worker
    # starts, and replaced by SIGHUP (server/tls_reload.py); None on plain HTTP.
    _served = ServedCertificate(_agent.tls) if _agent.tls is not None else None
    _fresh_start = hold_state_dir(_agent)
    prepare_state_dir(_agent)
except ConfigError as error:
    print(f"utopia-agent: configuration error: {error}", file=sys.stderr)
    sys.exit(2)
except StateDirInUse as error:
    print(f"utopia-agent: {error}", file=sys.stderr)
    sys.exit(2)


def _network_isolation(config, step: str) -> None:
    """`establish` or `leave` the claims' network isolation, on an engine connection of the master's
    own that is closed before any worker forks."""
    engine = EngineConnection(config.engine_timeout)
    try:
        getattr(NetworkIsolation(config, engine), step)()
    finally:
        engine.close()


try:
    _network_isolation(_agent, "establish")
except IsolationFailed as error:
    print(f"utopia-agent: UTOPIA_AGENT_NETWORK_ISOLATION=on, but claims cannot be isolated: {error}", file=sys.stderr)
    sys.exit(2)

def _disk_quota(config) -> None:
    """With UTOPIA_AGENT_DISK_QUOTA=engine, make sure the engine enforces container disk sizes, on
    an engine connection of the master's own; the other settings need no engine here."""
    if config.disk_quota != "engine":
        return
    engine = EngineConnection(config.engine_timeout)
    try:
        quota_in_force(config.disk_quota, read_storage(engine))
    finally:
        engine.close()


try:
    _disk_quota(_agent)
except (EngineCannotEnforce, AgentError) as error:
    print(f"utopia-agent: UTOPIA_AGENT_DISK_QUOTA=engine, but the engine does not enforce container disk sizes: "
          f"{getattr(error, 'message', error)}", file=sys.stderr)
    sys.exit(2)

try:
    MountPins(_agent.mounts_dir).prepare()
except OSError as error:
    logging.getLogger("utopia_agent").warning("volumes cannot be pinned, so creates with volumes will fail: %s", error)

try:
    # Before any worker: volumes mounted again (after a reboot), interrupted creates and deletes
    # finished, with no create of a worker's running meanwhile.
    VolumeStore(_agent.claim_volumes_root, _agent.claim_volume_backend).settle()
except ConfigError as error:
    print(f"utopia-agent: configuration error: {error}", file=sys.stderr)
    sys.exit(2)

# prometheus-client's multiprocess mode: every worker writes its counters here and a scrape
# sums them. It must be set before any worker imports prometheus_client, and it starts empty
# (once per agent: a HUP reload keeps the counters).
if _fresh_start:
    start_fresh(_agent)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(_agent))

bind = _agent.bind
workers = _agent.workers
# Threads keep /health and reads answering while other threads of the same worker wait on a
# long image pull; the gthread main loop heartbeats on its own, so a slow pull is no "hung" worker.
# The agent's own gthread reads each request whole in that loop before a thread takes it, so
# clients that send slowly or stall hold no thread (utopia_agent/server/worker.py).
worker_class = "utopia_agent.server.worker.WholeRequestWorker"
# 8 threads for requests, and one more for each event stream and each exec session the agent
# may serve (both bounded agent-wide, see utopia_agent/events/stream.py and exec/slots.py):
# open streams and sessions never take the 8.
threads = 8 + MAX_STREAMS + MAX_EXEC_SESSIONS
timeout = 60
# SIGTERM lets an in-flight create finish (or roll back) before the worker goes.
graceful_timeout = 90
keepalive = 5
# The app is loaded in each worker after the fork: NVML and the Docker client are per worker.
preload_app = False


class AgentLogger(Logger):
    """gunicorn's logger without its access log: the agent logs each request itself, with its request id."""

    def access(self, resp, req, environ, request_time):
        pass


logger_class = AgentLogger

# glibc gives each thread that allocates an arena of its own (up to 8 per core), and what a
# request's thread frees there stays resident: a worker's 8 + 16 threads grew its RSS by arenas
# alone. Set here, in the master, so every worker it forks shares at most two; the GIL already
# serializes the threads, and Python's small objects never reach malloc's locks.
_M_ARENA_MAX = -8
try:
    ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
except (AttributeError, OSError):  # not glibc: its own allocator's policy stands
    pass
logconfig_dict = logging_dict(_agent.log_format)
proc_name = "utopia-agent"
# gunicorn's control socket (gunicorn >= 25) lives with the agent's state, not in $HOME.
control_socket = str(_agent.state_dir / "gunicorn.ctl")


def when_ready(server):
    """Tell the operator where to reach the agent and how to authenticate (never the token itself).

    Said only once the port is bound, so nothing says "listening" before the configuration passed.
    """
    token_file = os.environ.get("UTOPIA_AGENT_TOKEN_FILE")
    source = "UTOPIA_AGENT_TOKEN" if os.environ.get("UTOPIA_AGENT_TOKEN") or not token_file else token_file
    scheme = "http" if _served is None else "https"
    logging.getLogger("utopia_agent").info(
        "listening on %s://%s with %d workers; send 'Authorization: Bearer <token>' with the token in %s",
        scheme, bind, workers, source,
    )
    if _served is not None:
        _served.install(server)


def post_fork(server, worker):
    """Give each worker the agent's bounds on reading a request and the pair in service (HTTPS);
    the state dir is the master's to hold, so a worker closes its inherited copy of the lock."""
    worker.read_timeout = _agent.read_timeout
    worker.body_limit = _agent.max_body_bytes
    if _served is not None:
        worker.tls_files, worker.tls_context = _agent.tls, _served.context
        note_served_certificate(_agent.tls)
    forget_inherited_holds()


def post_worker_init(worker):
    """A worker stops the graceful way on every quit signal.

    gthread's quick quit shuts its thread pool down inside the signal handler, which deadlocks
    when the signal lands while the pool is busy or a second one follows (CPython issue 121649).
    Ctrl-C sends SIGINT to the whole process group and the master then sends SIGQUIT, so the
    agent could hang on Ctrl-C until graceful_timeout. SIGINT is the master's to handle; its
    SIGQUIT lets in-flight requests finish, as SIGTERM does.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def end_streams_then_exit(sig, frame):
        """Event streams and exec sessions may last: end them, so the graceful stop does not wait for them."""
        app = getattr(worker, "wsgi", None)
        if app is not None and "utopia" in getattr(app, "extensions", {}):
            app.extensions["utopia"].events.close()
            app.extensions["utopia"].execs.close()
        worker.handle_exit(sig, frame)

    signal.signal(signal.SIGQUIT, end_streams_then_exit)
    signal.signal(signal.SIGTERM, end_streams_then_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn has it: a stop never interrupts a request


def on_exit(server):
    """A clean stop clears the lock file's record, so the CLI never reads a stale pid, and leaves
    no network or rules behind where no claim runs (with claims running, their protection stays)."""
    _network_isolation(_agent, "leave")
    release_state_dir(_agent)


def child_exit(server, worker):
    """Drop a dead worker's live gauges; its counters stay, so the sums never go backwards."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Shut NVML down and close the engine connection of the worker that is going away."""
    app = getattr(worker, "wsgi", None)
    if app is not None and "utopia" in getattr(app, "extensions", {}):
        app.extensions["utopia"].close()
