"""Exec sessions: a command run once with bounded output and a deadline, or interactively over a channel.

Every session, one-shot or interactive, holds a slot (slots.py) while it runs, and with it a
thread of the worker's beyond the request pool (gunicorn.conf.py). A session's command ends
with the session however it ends: past its timeout, idle past UTOPIA_AGENT_EXEC_IDLE_SECONDS,
or when its client goes away, it is killed (engine/exec.py); it ends by itself when the
container stops. Each session is one log line and one `exec` event when it ends, naming the
command by its first word only: arguments and env may hold secrets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..allocation.policy import check_env_vars
from ..claims.records import ManagedContainer
from ..config import Config
from ..engine.exec import STDERR, STDOUT, EngineExec
from ..engine.manager import DockerManager
from ..errors import AgentError, ContainerNotRunning
from ..events.changes import exec_change
from ..events.history import EventHistory
from .channels import CLOSE, RESIZE, STDIN, ClientMessage, status_message
from .slots import SessionSlots

log = logging.getLogger("utopia_agent.exec")

# How long a killed command's output may take to end before the session stops waiting for it.
KILLED_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool


class Channel(Protocol):
    """The client's side of an interactive session (the WebSocket, in api/exec.py)."""

    def receive(self) -> bytes | str | None:
        """The client's next message; None once it has gone."""

    def send(self, message: bytes) -> bool:
        """False when the client has gone."""

    def close(self) -> None:
        """End the connection, waking a `receive` that waits."""


class Execs:
    """One per worker: runs the sessions, bounds them, and ends them all when the worker stops."""

    def __init__(self, config: Config, docker: DockerManager, history: EventHistory):
        self._config = config
        self._docker = docker
        self._history = history
        self._slots = SessionSlots(config.state_dir / "exec", config.exec_sessions_per_claim)
        self._active: set[EngineExec] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def run_once(self, container_id: str, body: dict[str, Any]) -> ExecResult:
        """Run the command to its end or its timeout; its output kept up to UTOPIA_AGENT_EXEC_OUTPUT_BYTES a stream."""
        check_env_vars(body["env"], field="env")
        container = self._running(container_id)
        started = time.monotonic()
        with self._slot(container):
            exec_id = self._docker.create_exec(container.id, body["command"], env=body["env"], working_dir=body["working_dir"])
            with self.tracked(self._docker.start_exec(container.id, exec_id)) as process:
                result = collect(process, body["timeout"], self._config.exec_output_bytes)
        self.ended(container, body["command"], "once", started, result.exit_code, "timeout" if result.timed_out else "exited")
        return result

    def prepare(self, container_id: str, command: list[str], stdin: bool, tty: bool) -> PreparedSession:
        """Check and bound an interactive session before the client is answered: what fails here is an HTTP error.
        The command starts only in `PreparedSession.run`, once the client is connected."""
        container = self._running(container_id)
        slot = self._slots.take(container.claim_id)
        try:
            exec_id = self._docker.create_exec(container.id, command, stdin=stdin, tty=tty)
        except BaseException:
            os.close(slot)
            raise
        return PreparedSession(self, container, command, exec_id, stdin, tty, slot)

    @property
    def idle_seconds(self) -> float:
        return self._config.exec_idle_seconds

    def start(self, container_id: str, exec_id: str, tty: bool) -> EngineExec:
        return self._docker.start_exec(container_id, exec_id, tty)

    def close(self) -> None:
        """The worker stops: end every command it runs, so no session outlives it."""
        with self._lock:
            self._stopping = True
            active = list(self._active)
        for process in active:
            process.kill()

    def _running(self, container_id: str) -> ManagedContainer:
        container = self._docker.get_managed(container_id)
        if container.status != "running":
            raise ContainerNotRunning(f"container {container.id[:12]} is {container.status}: a command runs only in a running container")
        return container

    @contextmanager
    def _slot(self, container: ManagedContainer) -> Iterator[None]:
        slot = self._slots.take(container.claim_id)
        try:
            yield
        finally:
            os.close(slot)

    @contextmanager
    def tracked(self, process: EngineExec) -> Iterator[EngineExec]:
        """The command is ended by `close` while it runs, and the exec's connection closed after."""
        with self._lock:
            self._active.add(process)
            stopping = self._stopping
        try:
            if stopping:
                process.kill()
            yield process
        finally:
            with self._lock:
                self._active.discard(process)
            process.close()

    def ended(self, container: ManagedContainer, command: list[str], mode: str, started: float, exit_code: int | None,
              ended: str) -> None:
        """The session's one log line and its `exec` event."""
        duration = round(time.monotonic() - started, 3)
        program = command[0] if command else ""
        log.info("exec ended claim=%s container=%s command=%s mode=%s duration=%.3fs exit_code=%s ended=%s",
                 container.claim_id, container.id[:12], program, mode, duration, exit_code, ended,
                 extra={"claim_id": container.claim_id, "container_id": container.id})
        self._history.record([exec_change({
            "claim_id": container.claim_id, "container_id": container.id, "command": program, "mode": mode,
            "duration": duration, "exit_code": exit_code, "ended": ended,
        })])


def collect(process: EngineExec, timeout: float, bound: int) -> ExecResult:
    """The command's output to its end, each stream kept up to `bound` bytes (the rest read and dropped,
    so the command never blocks on a full pipe); past `timeout` it is killed."""
    kept = {STDOUT: bytearray(), STDERR: bytearray()}
    truncated = timed_out = False
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if not timed_out and now >= deadline:
            timed_out = True
            process.kill()
            deadline = now + KILLED_GRACE_SECONDS
        elif timed_out and now >= deadline:
            break  # killed, yet something still holds its output open
        chunks = process.read(deadline - now)
        if chunks is None:
            break
        for stream, data in chunks:
            room = bound - len(kept[stream])
            if len(data) > room:
                truncated = True
                data = data[:max(room, 0)]
            kept[stream] += data
    return ExecResult(process.exit_code(), kept[STDOUT].decode(errors="replace"), kept[STDERR].decode(errors="replace"), truncated, timed_out)


class PreparedSession:
    """An interactive session whose exec is created and slot held; `run` it once the client is connected, or `abandon` it."""

    def __init__(self, execs: Execs, container: ManagedContainer, command: list[str], exec_id: str, stdin: bool, tty: bool, slot: int):
        self._execs = execs
        self.container = container
        self.command = command
        self._exec_id = exec_id
        self.stdin = stdin
        self.tty = tty
        self._slot = slot
        self._last_activity = time.monotonic()

    def abandon(self) -> None:
        os.close(self._slot)

    def run(self, channel: Channel) -> None:
        """Pass the channels both ways until the command ends (its status then goes on channel 3), the client goes,
        or the session is idle past UTOPIA_AGENT_EXEC_IDLE_SECONDS (both end the command)."""
        started = time.monotonic()
        exit_code, ended = None, "exited"
        try:
            try:
                process = self._execs.start(self.container.id, self._exec_id, self.tty)
            except AgentError as error:  # the container stopped since the checks: the client is told on channel 3
                channel.send(status_message(None, error.message))
                channel.close()
                ended = "not started"
                return
            with self._execs.tracked(process) as process:
                gone = threading.Event()
                reader = threading.Thread(target=self._pump_input, args=(channel, process, gone), name="exec-input", daemon=True)
                reader.start()
                ended = self._pump_output(channel, process, gone)
                exit_code = process.exit_code()
                if not gone.is_set():
                    channel.send(status_message(exit_code))
                channel.close()
                reader.join(KILLED_GRACE_SECONDS)
        finally:
            os.close(self._slot)
            self._execs.ended(self.container, self.command, "interactive", started, exit_code, ended)

    def _pump_input(self, channel: Channel, process: EngineExec, gone: threading.Event) -> None:
        """The client's messages to the command, until the client goes; then the command goes too."""
        while (message := channel.receive()) is not None:
            self._last_activity = time.monotonic()
            parsed = ClientMessage.parse(message)
            if parsed is None:
                continue
            if parsed.channel == STDIN and self.stdin:
                process.write(parsed.payload)
            elif parsed.channel == RESIZE and self.tty and (size := parsed.size()) is not None:
                process.resize(*size)
            elif parsed.channel == CLOSE and parsed.payload[:1] == bytes([STDIN]):
                process.close_stdin()
        if not gone.is_set():
            gone.set()
            process.kill()

    def _pump_output(self, channel: Channel, process: EngineExec, gone: threading.Event) -> str:
        """The command's output to the client until it ends; how the session ended."""
        idle = self._execs.idle_seconds
        ended, killed_at = "exited", None
        while True:
            now = time.monotonic()
            if killed_at is None:
                wait = self._last_activity + idle - now
                if wait <= 0:
                    ended, killed_at = "idle", now
                    process.kill()
                elif gone.is_set():
                    ended, killed_at = "client gone", now
            if killed_at is not None:
                wait = killed_at + KILLED_GRACE_SECONDS - now
                if wait <= 0:
                    return ended
            chunks = process.read(wait)
            if chunks is None:
                return "client gone" if gone.is_set() and ended == "exited" else ended
            if chunks:
                self._last_activity = time.monotonic()
            for stream, data in chunks:
                if not channel.send(bytes([stream]) + data) and not gone.is_set():
                    gone.set()
                    process.kill()
