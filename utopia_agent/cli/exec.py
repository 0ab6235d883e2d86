"""`utopia-agent exec [-i] [-t] ID -- CMD...`: a command in a claim's container, as `docker exec` runs one.

With -t the terminal goes raw (every key reaches the command, Ctrl-C included) and its size
follows the window (SIGWINCH); with -i stdin is passed on, its end closing the command's. The
exit code is the command's.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import termios
import threading
import tty as terminal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .. import client as api
from .common import EXIT_FAILED

STDIN_CHUNK = 64 * 1024


def run_exec(client: api.AgentClient, container_id: str, command: Sequence[str], stdin: bool, tty: bool) -> int:
    """Run `command` interactively; the command's exit code (1 when the agent could not tell it)."""
    session = client.exec_session(container_id, command, stdin=stdin, tty=tty)
    with session, _raw(tty and sys.stdin.isatty()), _resizing(session if tty else None):
        if stdin:
            threading.Thread(target=_pass_stdin, args=(session,), name="exec-stdin", daemon=True).start()
        out, err = sys.stdout.buffer, sys.stderr.buffer
        while (piece := session.read()) is not None:
            stream = out if piece[0] == api.ExecSession.STDOUT else err
            stream.write(piece[1])
            stream.flush()
    return session.exit_code if session.exit_code is not None else EXIT_FAILED


def _pass_stdin(session: api.ExecSession) -> None:
    fd = sys.stdin.fileno()
    try:
        while data := os.read(fd, STDIN_CHUNK):
            session.write(data)
        session.close_stdin()
    except (OSError, RuntimeError):
        pass  # the session ended, or (v4) has no way to close stdin: it ends with the session


@contextmanager
def _raw(wanted: bool) -> Iterator[None]:
    """The terminal in raw mode while the session runs, as it was afterwards."""
    if not wanted:
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    terminal.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def _resizing(session: api.ExecSession | None) -> Iterator[None]:
    """Send the window's size now and on each SIGWINCH."""
    if session is None:
        yield
        return

    def resize(*_signal) -> None:
        size = shutil.get_terminal_size()
        session.resize(size.columns, size.lines)

    previous = signal.signal(signal.SIGWINCH, resize)
    resize()
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
