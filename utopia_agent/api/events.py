"""The node's changes as a stream (the contract's "Events"): what an orchestrator watches instead of polling."""

from __future__ import annotations

import os

from flask import Blueprint, Response, request

from ..errors import InvalidRequest, RevisionTooOld, TooManyStreams
from ..schemas import EventsQuerySchema
from ..services import services
from .operations import Responds, Routes, fails

blueprint = Blueprint("events", __name__, url_prefix="/events")
routes = Routes(blueprint, tag="events")
REVISION_HEADER = "X-Utopia-Revision"


@routes.get("", "watchEvents", summary="The node's changes, one JSON line each with a revision that only grows, then each new one as it comes",
            description=(
                "Without `since` the stream starts now, with a heartbeat carrying the current revision; with `since` it "
                "first sends every change after it, in order, each once. A heartbeat comes at least every "
                "UTOPIA_AGENT_EVENTS_HEARTBEAT_SECONDS. Lines: `revision`, `time`, `kind` (container, gpu, node, exec, "
                "heartbeat), `action`, `object`, and for an exit `exit_code` and `oom_killed`. With `timeout` the stream "
                "ends after that many seconds with a last heartbeat: watch again with `since` set to its revision."
            ),
            query=EventsQuerySchema(),
            responds=Responds(200, "The changes, as newline-delimited JSON, until the client goes or `timeout` passes.",
                              content_type="application/x-ndjson"),
            failures=(
                fails("`since` is not a non-negative integer, or is ahead of the node's last revision; or `timeout` is not a whole "
                      "number of seconds from 1 to the maximum.", InvalidRequest),
                fails("The history no longer holds every change after `since`: list again and watch from the list's revision.", RevisionTooOld),
                fails("The agent already serves as many event streams as it may; retry after Retry-After seconds.", TooManyStreams),
            ))
def watch_events(query: dict) -> Response:
    lines, slot = services().events.open(query.get("since"), request.environ.get("gunicorn.socket"), query.get("timeout"))
    response = Response(lines, mimetype="application/x-ndjson", headers={"X-Accel-Buffering": "no", "Cache-Control": "no-store"})
    response.call_on_close(lambda: os.close(slot))
    return response
