"""An interactive exec session on the agent's WebSocket route, in Kubernetes' channel protocol.

    with client.exec_session(container_id, ["sh"], stdin=True, tty=True) as shell:
        shell.write(b"ls\\n")
        shell.close_stdin()
        out, err = shell.read_all()
    shell.exit_code

websocket-client speaks the WebSocket; this module only puts a channel byte before each message
and reads the final status (channel 3) into `exit_code`.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode

import requests
import websocket
from requests.structures import CaseInsensitiveDict

from .errors import AgentUnreachable, error_from_response

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


class ExecSession:
    """One session: `write` to stdin, `read` the output, `resize` the terminal; `exit_code` once it ended."""

    STDOUT, STDERR = STDOUT, STDERR

    def __init__(self, ws: websocket.WebSocket):
        self._ws = ws
        self.protocol: str = ws.subprotocol or ""
        self.status: dict[str, Any] | None = None
        self.ended = False

    @classmethod
    def open(cls, url: str, token: str | None, container_id: str, command: Iterable[str], *, stdin: bool = False,
             tty: bool = False, timeout: float = 30.0, ca_file: str | Path | None = None,
             client_cert: str | Path | tuple[str | Path, str | Path] | None = None) -> ExecSession:
        """Connect to the agent at `url` (http:// or https://) and start `command`; refusals raise the agent's error classes."""
        query = urlencode([("command", part) for part in command] + [("stdin", str(stdin).lower()), ("tty", str(tty).lower())])
        ws_url = "ws" + url.rstrip("/").removeprefix("http") + f"/api/v1/containers/{container_id}/exec?{query}"
        sslopt: dict[str, Any] = {}
        if ca_file is not None:
            sslopt["ca_certs"] = str(ca_file)
        if client_cert is not None:
            cert, key = client_cert if isinstance(client_cert, tuple) else (client_cert, None)
            sslopt["certfile"] = str(cert)
            if key is not None:
                sslopt["keyfile"] = str(key)
        header = [f"Authorization: Bearer {token}"] if token else []
        try:
            ws = websocket.create_connection(ws_url, header=header, subprotocols=[V5, V4], timeout=timeout, sslopt=sslopt,
                                             enable_multithread=True, skip_utf8_validation=True)
        except websocket.WebSocketBadStatusException as refused:
            raise error_from_response(_answer(refused)) from None
        except (OSError, ssl.SSLError, websocket.WebSocketException) as error:
            raise AgentUnreachable(f"GET {ws_url}: {error}") from None
        ws.settimeout(None)
        return cls(ws)

    @property
    def exit_code(self) -> int | None:
        """0 for Success, the command's code for NonZeroExitCode; None before the end, or when the agent could not tell."""
        if self.status is None:
            return None
        if self.status.get("status") == "Success":
            return 0
        try:
            return int(self.status["details"]["causes"][0]["message"])
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def write(self, data: bytes) -> None:
        self._ws.send_binary(bytes([STDIN]) + data)

    def close_stdin(self) -> None:
        """The command reads the end of its input (v5; a v4 agent ends input only with the session)."""
        if self.protocol != V5:
            raise RuntimeError("closing stdin needs v5.channel.k8s.io; this session speaks " + self.protocol)
        self._ws.send_binary(bytes([CLOSE, STDIN]))

    def resize(self, width: int, height: int) -> None:
        self._ws.send_binary(bytes([RESIZE]) + json.dumps({"Width": width, "Height": height}).encode())

    def read(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """The next piece of output as (1 stdout or 2 stderr, bytes); None once the session ended. TimeoutError past `timeout`."""
        while not self.ended:
            self._ws.settimeout(timeout)
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                raise TimeoutError(f"no output within {timeout} s") from None
            except (websocket.WebSocketConnectionClosedException, OSError):
                opcode, data = websocket.ABNF.OPCODE_CLOSE, b""
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.ended = True
                break
            if isinstance(data, str):
                data = data.encode()
            if not data:
                continue
            if data[0] == STATUS:
                self.status = json.loads(data[1:])
            elif data[0] in (STDOUT, STDERR):
                return data[0], bytes(data[1:])
        return None

    def read_all(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """stdout and stderr to the session's end, each read waiting at most `timeout`."""
        out, err = bytearray(), bytearray()
        while (piece := self.read(timeout)) is not None:
            (out if piece[0] == STDOUT else err).extend(piece[1])
        return bytes(out), bytes(err)

    def close(self) -> None:
        """End the session (the agent then ends the command)."""
        self._ws.close(timeout=2)

    def abort(self) -> None:
        """Drop the connection with no goodbye, as a client that was killed would."""
        try:
            self._ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._ws.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _answer(refused: websocket.WebSocketBadStatusException) -> requests.Response:
    """The refusal of the upgrade as a response, for the client's one map from answers to error classes."""
    response = requests.Response()
    response.status_code = refused.status_code
    response.headers = CaseInsensitiveDict(refused.resp_headers or {})
    response._content = refused.resp_body if isinstance(refused.resp_body, bytes) else (refused.resp_body or "").encode()
    return response
