"""A command run in a container (the engine's exec): its output as it comes, its stdin, its terminal, and its end.

The engine has no call that ends an exec: a client that goes away leaves the process running.
`EngineExec.kill` ends it from the host instead: the exec's host pid comes from the engine's
inspect, and the process and its descendants get SIGKILL through pidfds, each opened and then
confirmed still the one meant (the exec still running with that pid, a child still a child of
its parent), so a pid the kernel gave to another process since is never signalled.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from .connection import EngineConnection
from .errors import EngineConflict, EngineNotFound
from ..errors import ContainerNotRunning, NotManaged

log = logging.getLogger("utopia_agent.exec")

RECV_SIZE = 256 * 1024
STDOUT, STDERR = 1, 2
# How long the engine may take to record an exit code once the output has ended.
EXIT_RECORDED_SECONDS = 2.0
_HEADER = struct.Struct(">BxxxL")


class EngineExec:
    """One exec, started: read its output, write its stdin, resize its terminal, kill it; `close` when done."""

    def __init__(self, engine: EngineConnection, exec_id: str, raw: Any, tty: bool):
        self._engine = engine
        self.exec_id = exec_id
        self._raw = raw  # docker-py's object, which keeps the HTTP response (and so the connection) alive
        self._sock: socket.socket = getattr(raw, "_sock", raw)
        self._sock.settimeout(None)
        self.tty = tty
        self._frames = bytearray()

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float | None) -> list[tuple[int, bytes]] | None:
        """What came within `timeout` as (STDOUT or STDERR, bytes) chunks ([] when nothing did); None at the end."""
        if not select.select([self._sock], [], [], timeout)[0]:
            return []
        try:
            data = self._sock.recv(RECV_SIZE)
        except OSError:
            data = b""
        if not data:
            return None
        if self.tty:
            return [(STDOUT, data)]
        return self._demux(data)

    def _demux(self, data: bytes) -> list[tuple[int, bytes]]:
        """The engine's multiplexed stream (an 8-byte header per write) into chunks, consecutive ones of a stream joined."""
        frames = self._frames
        frames += data
        view = memoryview(frames)
        runs: list[tuple[int, list[memoryview]]] = []
        offset = 0
        while len(frames) - offset >= _HEADER.size:
            stream, size = _HEADER.unpack_from(frames, offset)
            end = offset + _HEADER.size + size
            if end > len(frames):
                break
            stream = STDERR if stream == STDERR else STDOUT
            if not runs or runs[-1][0] != stream:
                runs.append((stream, []))
            runs[-1][1].append(view[offset + _HEADER.size:end])
            offset = end
        chunks = [(stream, b"".join(pieces)) for stream, pieces in runs]
        del view, runs
        del frames[:offset]
        return chunks

    def write(self, data: bytes) -> None:
        """To the command's stdin; a command that has gone is no error (its end comes on the output)."""
        try:
            self._sock.sendall(data)
        except OSError:
            pass

    def close_stdin(self) -> None:
        """The command reads the end of its input (the engine passes the half close on)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def resize(self, width: int, height: int) -> None:
        try:
            with self._engine.call("resize exec") as api:
                api.exec_resize(self.exec_id, height=height, width=width)
        except (EngineNotFound, EngineConflict):
            pass  # not started yet, or over: the next resize or the end comes

    def inspect(self) -> dict[str, Any]:
        with self._engine.call("inspect exec") as api:
            return api.exec_inspect(self.exec_id)

    def exit_code(self) -> int | None:
        """The command's exit code once the engine has it (128 + the signal for a killed one); None if it never says."""
        give_up = time.monotonic() + EXIT_RECORDED_SECONDS
        while True:
            try:
                info = self.inspect()
            except NotManaged:
                return None
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() >= give_up:
                return None
            time.sleep(0.01)

    def kill(self) -> bool:
        """End the command and every process under it (the engine has no call for it); True when one was signalled."""
        try:
            info = self.inspect()
        except NotManaged:
            return False
        pid = int(info.get("Pid") or 0)
        if not info.get("Running") or pid <= 0:
            return False

        def still_the_exec() -> bool:
            try:
                again = self.inspect()
            except NotManaged:
                return False
            return bool(again.get("Running")) and int(again.get("Pid") or 0) == pid

        return kill_process_tree(pid, still_the_exec)

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            close = getattr(self._raw, "close", None)
            if close is not None:
                close()


def create_exec(engine: EngineConnection, container_id: str, command: list[str], *, env: list[str] | None = None,
                working_dir: str = "", stdin: bool = False, tty: bool = False) -> str:
    """Create (not start) the exec, with the container's own user, capabilities and no-new-privileges: never privileged."""
    try:
        with engine.call("create exec") as api:
            created = api.exec_create(container_id, command, stdout=True, stderr=True, stdin=stdin, tty=tty, privileged=False,
                                      user="", environment=env or None, workdir=working_dir or None)
    except EngineConflict as conflict:
        raise ContainerNotRunning(f"container {container_id[:12]} is not running: {conflict.reason}") from None
    return created["Id"]


def start_exec(engine: EngineConnection, container_id: str, exec_id: str, tty: bool) -> EngineExec:
    """Start a created exec, its stdio on a connection of its own (the engine hijacks the HTTP connection)."""
    try:
        with engine.call("start exec") as api:
            raw = api.exec_start(exec_id, tty=tty, socket=True)
    except EngineConflict as conflict:
        raise ContainerNotRunning(f"container {container_id[:12]} is not running: {conflict.reason}") from None
    return EngineExec(engine, exec_id, raw, tty)


def kill_process_tree(pid: int, still_meant: Callable[[], bool]) -> bool:
    """SIGKILL `pid` and its descendants, each through a pidfd opened while it was confirmed the one meant."""
    try:
        root = os.pidfd_open(pid)
    except OSError:
        return False
    if not still_meant():
        os.close(root)
        return False
    held = [(pid, root)]
    try:
        seen = 0
        while seen < len(held):
            parent, _ = held[seen]
            seen += 1
            for child in _children(parent):
                try:
                    fd = os.pidfd_open(child)
                except OSError:
                    continue
                if _parent_of(child) != parent:  # gone and its pid given to another since it was listed
                    os.close(fd)
                    continue
                held.append((child, fd))
        for _, fd in held:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        return True
    finally:
        for _, fd in held:
            os.close(fd)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                children += [int(child) for child in listed.read().split()]
        except OSError:
            continue
    return children


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
