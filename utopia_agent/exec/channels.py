"""Kubernetes' channel protocol for exec (client-go tools/remotecommand, KEP-4006), as the agent speaks it.

Each WebSocket message starts with one byte of channel: 0 stdin, 1 stdout, 2 stderr, 3 the
final status (a Kubernetes `Status` as JSON), 4 a terminal resize (`{"Width", "Height"}`).
v5 adds 255: `[255, channel]` closes that channel (the client closing stdin: its end of input).
v4 clients close stdin only by closing the whole connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PROTOCOLS = (V5, V4)
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


@dataclass(frozen=True)
class ClientMessage:
    """One message from the client: its channel and what follows the channel byte."""

    channel: int
    payload: bytes

    @classmethod
    def parse(cls, message: bytes | str) -> ClientMessage | None:
        """A binary message as it is; a text one (some clients send stdin as text) with its first character as the channel."""
        if isinstance(message, str):
            if not message:
                return None
            return cls(ord(message[0]), message[1:].encode())
        if not message:
            return None
        return cls(message[0], bytes(message[1:]))

    def size(self) -> tuple[int, int] | None:
        """A resize's (width, height), or None when it is not one the terminal can take."""
        try:
            size = json.loads(self.payload)
            width, height = int(size["Width"]), int(size["Height"])
        except (ValueError, TypeError, KeyError):
            return None
        return (width, height) if 0 < width <= 65535 and 0 < height <= 65535 else None


def status_message(exit_code: int | None, failure: str = "the engine did not record the command's exit code") -> bytes:
    """The final status on channel 3: Success for 0, else the exit code as client-go reads it; without an exit code, `failure`."""
    if exit_code == 0:
        status = {"metadata": {}, "status": "Success"}
    elif exit_code is None:
        status = {"metadata": {}, "status": "Failure", "message": failure, "reason": "InternalError"}
    else:
        status = {
            "metadata": {}, "status": "Failure", "message": f"command terminated with non-zero exit code: {exit_code}",
            "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
        }
    return bytes([STATUS]) + json.dumps(status).encode()
