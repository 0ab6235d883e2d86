"""Commands in a claim's container: POST runs one to its end; GET upgrades to a WebSocket session.

The session speaks Kubernetes' channel protocol (exec/channels.py), so kubectl-style clients and
browser terminals work as they are. simple-websocket does the handshake and the framing on the
connection gunicorn hands the view; the session then holds the view's thread until it ends
(one of the threads beyond the request pool, see gunicorn.conf.py), and gunicorn is told the
connection is no longer HTTP.
"""

from __future__ import annotations

import logging
import socket
import threading

from flask import Blueprint, Response, g, request
from simple_websocket import ConnectionClosed, Server
from wsproto.utilities import RemoteProtocolError

from ..errors import ContainerNotRunning, EngineError, InvalidRequest, PolicyViolation, TooManyExecSessions
from ..exec.channels import PROTOCOLS
from ..exec.schemas import ExecQuerySchema, ExecResultSchema, ExecSchema
from ..schemas import ContainerPathSchema
from ..services import services
from .containers import NOT_MANAGED
from .operations import ENGINE_DOWN, Responds, Routes, fails

log = logging.getLogger("utopia_agent.exec")
blueprint = Blueprint("exec", __name__, url_prefix="/containers")
routes = Routes(blueprint, tag="containers", path=ContainerPathSchema())
# The largest message a client may send (stdin comes in far smaller pieces).
MAX_MESSAGE_BYTES = 1024 * 1024
RECEIVE_BYTES = 256 * 1024
# How long the client may take to answer the close before its connection is cut.
CLOSE_WAIT_SECONDS = 2.0

NOT_RUNNING = fails("The container is not running: a command runs only in a running container.", ContainerNotRunning)
TOO_MANY = fails(
    "The claim already runs UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM exec sessions, or the agent 16; retry after Retry-After seconds.",
    TooManyExecSessions,
)
ENGINE_FAILED = fails("The engine failed to run the command.", EngineError)


@routes.post("/<container_id>/exec", "execOnce", summary="Run a command in the container to its end, with its output",
             description=(
                 "The command runs as the container's own user, with its capabilities and no-new-privileges, never privileged. "
                 "stdout and stderr are each kept up to UTOPIA_AGENT_EXEC_OUTPUT_BYTES (`truncated` says when more came); past "
                 "`timeout` the command and every process under it are killed (`timed_out`)."
             ),
             body=ExecSchema(),
             responds=Responds(200, "The command ended (or was killed at its timeout).", ExecResultSchema()),
             failures=(
                 fails("The body is not JSON, or a field is missing, unknown, of the wrong type or out of range; `errors` names each.",
                       InvalidRequest),
                 fails("`env` names a reserved variable (NVIDIA_*, CUDA_VISIBLE_DEVICES, ...).", PolicyViolation),
                 NOT_MANAGED, NOT_RUNNING, TOO_MANY, ENGINE_FAILED, ENGINE_DOWN,
             ))
def exec_once(container_id: str, body: dict):
    return services().execs.run_once(container_id, body)


@routes.route("GET", "/<container_id>/exec", "execInteractive", websocket=True,
              summary="A WebSocket session running a command in the container (Kubernetes' channel protocol)",
              description=(
                  "Upgrade with `Sec-WebSocket-Protocol: v5.channel.k8s.io` (or `v4.channel.k8s.io`). Each message starts with "
                  "one byte of channel: 0 stdin, 1 stdout, 2 stderr, 3 the final Kubernetes `Status` (JSON; the exit code in "
                  "`details.causes`), 4 a resize `{\"Width\", \"Height\"}`, and in v5 `[255, 0]` closes stdin. The session ends "
                  "when the command ends, the container stops, the client goes (the command is then killed) or after "
                  "UTOPIA_AGENT_EXEC_IDLE_SECONDS without traffic. The read-only token is refused, though this is a GET."
              ),
              query=ExecQuerySchema(),
              responds=Responds(101, "Switching Protocols: the session runs on the WebSocket.", content_type=None),
              failures=(
                  fails("Not a WebSocket upgrade, no channel subprotocol offered, or the query is invalid (`errors` names each field).",
                        InvalidRequest),
                  NOT_MANAGED, NOT_RUNNING, TOO_MANY, ENGINE_FAILED, ENGINE_DOWN,
              ))
def exec_interactive(container_id: str, query: dict) -> Response:
    offered = [name.strip() for name in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if not any(name in PROTOCOLS for name in offered):
        raise InvalidRequest(f"offer the subprotocol {' or '.join(PROTOCOLS)} (Sec-WebSocket-Protocol)")
    prepared = services().execs.prepare(container_id, query["command"], query["stdin"], query["tty"])
    g.claim_id = prepared.container.claim_id
    connection = request.environ["gunicorn.socket"]
    try:
        # simple-websocket finds the connection under gunicorn's key; it gets one whose sends are whole.
        ws = Server(dict(request.environ, **{"gunicorn.socket": WholeSends(connection)}), subprotocols=list(PROTOCOLS),
                    receive_bytes=RECEIVE_BYTES, max_message_size=MAX_MESSAGE_BYTES)
    except RemoteProtocolError as refused:  # nothing was sent: the answer is still HTTP
        prepared.abandon()
        raise InvalidRequest(f"not a WebSocket handshake: {refused}") from None
    except BaseException:
        prepared.abandon()
        raise
    channel = WebSocketChannel(ws, connection)
    try:
        prepared.run(channel)
    except Exception:  # past the upgrade no HTTP answer may be written: it would read as a broken frame
        log.exception("exec session failed claim=%s container=%s", prepared.container.claim_id, prepared.container.id[:12])
        channel.close()
    return TakenOver(status=101)


class TakenOver(Response):
    """The answer of a connection the session took over: gunicorn writes nothing and closes it (as flask-sock does)."""

    def __call__(self, environ, start_response):
        raise StopIteration()


class WholeSends:
    """The connection as simple-websocket uses it: each send written whole, one at a time (its thread answers pings too)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._sending = threading.Lock()

    def send(self, data: bytes) -> int:
        with self._sending:
            self._sock.sendall(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class WebSocketChannel:
    """The session's channel (exec/runner.Channel) on a simple-websocket connection."""

    def __init__(self, ws: Server, connection: socket.socket):
        self._ws = ws
        self._connection = connection

    def receive(self) -> bytes | str | None:
        try:
            return self._ws.receive()
        except ConnectionClosed:
            return None

    def send(self, message: bytes) -> bool:
        try:
            self._ws.send(message)
            return True
        except (ConnectionClosed, OSError):
            return False

    def close(self) -> None:
        """Close the WebSocket, wait a moment for the client's answer, then cut the connection; wakes `receive`."""
        try:
            self._ws.close()
        except (ConnectionClosed, OSError):
            pass
        self._ws.thread.join(CLOSE_WAIT_SECONDS)
        if self._ws.thread.is_alive():
            try:
                self._connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._ws.thread.join(CLOSE_WAIT_SECONDS)
        self._ws.event.set()
