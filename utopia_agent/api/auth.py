"""Bearer-token authentication, compared in constant time."""

from __future__ import annotations

import hmac

from flask import request

from ..errors import Unauthorized


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for anything else."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_token(expected: str) -> None:
    """Raise Unauthorized unless the request carries exactly the expected token."""
    given = bearer_token()
    if given is None:
        raise Unauthorized("missing or malformed Authorization header; expected 'Bearer <token>'")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("invalid token")
