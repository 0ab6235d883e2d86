"""Bearer-token authentication, compared in constant time: the full token, or the one that only reads."""

from __future__ import annotations

import hmac

from flask import request

from ..config import Config
from ..errors import ReadOnlyToken, Unauthorized

# What the read-only token may do: methods that change nothing, whatever the route (new ones included).
READ_METHODS = frozenset({"GET", "HEAD"})


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for anything else."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_token(config: Config) -> None:
    """Raise Unauthorized unless the request carries the token, or the read-only token on a read
    (ReadOnlyToken on anything else, an upgraded GET included). Both are compared, so the time taken tells neither."""
    given = bearer_token()
    if given is None:
        raise Unauthorized("missing or malformed Authorization header; expected 'Bearer <token>'")
    full = hmac.compare_digest(given.encode(), config.token.encode())
    read_only = hmac.compare_digest(given.encode(), (config.read_token or "").encode()) and config.read_token is not None
    if full:
        return
    if not read_only:
        raise Unauthorized("invalid token")
    if request.method not in READ_METHODS:
        raise ReadOnlyToken(f"the read-only token may only read (GET), not {request.method}")
    if request.headers.get("Upgrade", "").lower() == "websocket":
        raise ReadOnlyToken("the read-only token may only read: a WebSocket session (an exec) is no read, though its upgrade is a GET")
