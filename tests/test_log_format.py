"""The operator log's JSON lines: one object per record, extras as keys, each record's own time."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from utopia_agent.observability.logs import JsonFormatter


def record(created: float, message: str = "GET %s %d", args: tuple = ("/health", 200), **extra) -> logging.LogRecord:
    made = logging.getLogger("utopia_agent.requests").makeRecord("utopia_agent.requests", logging.INFO, "", 0, message, args, None, extra=extra)
    made.created, made.msecs = created, int((created - int(created)) * 1000)
    return made


def test_a_line_is_one_json_object_with_the_record_s_time_and_its_extras_in_order():
    line = JsonFormatter().format(record(1795636800.25, request_id="r1", status=200, where=Path("/srv")))
    assert list(json.loads(line).items()) == [
        ("time", "2026-11-25T20:00:00.250Z"), ("level", "info"), ("logger", "utopia_agent.requests"),
        ("message", "GET /health 200"), ("request_id", "r1"), ("status", 200), ("where", "/srv"),
    ]


def test_each_record_gets_its_own_second_though_the_formatter_keeps_the_last_one():
    formatter = JsonFormatter()
    stamps = [json.loads(formatter.format(record(at)))["time"] for at in (1795636800.999, 1795636801.0, 1795636800.5, 1795640400.0)]
    assert stamps == ["2026-11-25T20:00:00.999Z", "2026-11-25T20:00:01.000Z", "2026-11-25T20:00:00.500Z", "2026-11-25T21:00:00.000Z"]


def test_an_exception_is_one_key_of_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.getLogger("t").makeRecord("t", logging.ERROR, "", 0, "failed", (), exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(failed))
    assert entry["level"] == "error" and "ValueError: boom" in entry["exception"] and "\n" not in JsonFormatter().format(failed)
