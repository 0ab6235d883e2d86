"""The shapes of exec in a claim's container: the one-shot request and answer, the interactive session's query."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from ..schemas import ENV_ENTRY, MAX_LIST_ITEMS, MAX_STRING, NO_NUL, FullMatch, ResponseSchema, StrictNumber, names_fit

MAX_EXEC_TIMEOUT = 24 * 3600
_EXEC_COMMAND = dict(
    validate=validate.Length(min=1, max=MAX_LIST_ITEMS),
    metadata={"description": "The program and its arguments, run in the container as its own user, without a shell."},
)


class ExecSchema(Schema):
    """POST /api/v1/containers/<id>/exec body; unknown fields are refused."""

    command = fields.List(fields.String(validate=[validate.Length(max=MAX_STRING), NO_NUL]), required=True, **_EXEC_COMMAND)
    env = fields.List(
        ENV_ENTRY, load_default=list, validate=validate.Length(max=MAX_LIST_ITEMS),
        metadata={"description": "Environment entries `KEY=value` added for this command; GPU-selecting names are refused, as at create."},
    )
    working_dir = fields.String(
        load_default="",
        validate=[validate.Length(max=MAX_STRING), FullMatch(r"^(/[^\x00]*)?$", error="must be empty or an absolute path without NUL characters"),
                  names_fit],
        metadata={"description": "Absolute directory to run in; empty keeps the container's."},
    )
    timeout = StrictNumber(
        load_default=60.0, validate=validate.Range(0.1, MAX_EXEC_TIMEOUT),
        metadata={"description": "Seconds the command may run; past them it and its children are killed and `timed_out` is true."},
    )


class ExecResultSchema(ResponseSchema):
    exit_code = fields.Integer(required=True, allow_none=True, metadata={"description": "The command's exit status (128 + signal when killed)."})
    stdout = fields.String(required=True, metadata={
        "description": "Its standard output (UTF-8, undecodable bytes replaced), at most UTOPIA_AGENT_EXEC_OUTPUT_BYTES."})
    stderr = fields.String(required=True, metadata={"description": "Its standard error, bounded the same way."})
    truncated = fields.Boolean(required=True, metadata={"description": "True when stdout or stderr was longer than the bound: the rest was read and dropped."})
    timed_out = fields.Boolean(required=True, metadata={"description": "True when the command ran past `timeout` and was killed."})


class ExecQuerySchema(Schema):
    """GET /api/v1/containers/<id>/exec (the WebSocket upgrade) query; `command` is repeated, one per argument."""

    command = fields.List(fields.String(validate=[validate.Length(max=MAX_STRING), NO_NUL]), required=True, **_EXEC_COMMAND)
    stdin = fields.Boolean(load_default=False, metadata={"description": "Pass channel 0 to the command's standard input."})
    tty = fields.Boolean(load_default=False, metadata={"description": "Run the command on a terminal (stderr then comes on stdout); resize on channel 4."})
