"""Request bodies: parsed as JSON whatever Content-Type says, then validated by a schema."""

from __future__ import annotations

import json

from flask import request
from marshmallow import Schema

from ..errors import InvalidRequest
from ..schemas import load_request


def json_body():
    """The body as JSON; anything unparsable (or absurdly nested) is a 400."""
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise InvalidRequest("the body must be JSON", errors={"_schema": ["expected a JSON object"]}) from None


def load_body(schema: Schema) -> dict:
    """The body, validated by `schema` (400 with per-field messages otherwise)."""
    return load_request(schema, json_body())
