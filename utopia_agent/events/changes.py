"""What a change of a container, a GPU or the drain is as a line of the history (without its revision).

A container's change is told from two inspects of it (the node view's record before and after)
and the engine's events in between: the view inspects a container once per batch of its events,
so a create and a start, or an exit and a restart, may come as one change of record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..claims.records import CLAIM_LABEL, ManagedContainer
from ..schemas import ContainerSchema

if TYPE_CHECKING:  # the node view's record; the view itself is above this layer
    from ..engine.node_view import ContainerState

_container = ContainerSchema()


def container_object(state: ContainerState) -> dict[str, Any]:
    """The container as GET /api/v1/containers/<id> shows it."""
    return _container.dump(ManagedContainer.from_state(state))


def container_changes(before: ContainerState | None, after: ContainerState | None, engine_actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history's lines for one container whose record went from `before` to `after`.

    `engine_actions` are the engine's events for it in this batch (their `Action` and
    `Actor.Attributes`): a die's exit code is taken from there when the record no longer shows
    it (the container restarted, or was removed, since)."""
    if before is None and after is None:
        return []
    actions = [event.get("Action", "") for event in engine_actions]
    died = [event for event in engine_actions if event.get("Action") == "die"]
    lines: list[dict[str, Any]] = []

    def line(action: str, **extra: Any) -> None:
        shown = container_object(after) if after is not None else {"id": before.id, "claim_id": before.labels.get(CLAIM_LABEL, "")}
        lines.append({"kind": "container", "action": action, **extra, "object": shown})

    if before is None:
        line("created")
    started = after is not None and after.started > 0 and (
        before is None or "start" in actions or after.started != before.started or after.restart_count != before.restart_count
    )
    ended = after is not None and after.status in ("exited", "dead")
    exited = bool(died) or (ended and (before is None or after.finished != before.finished or before.status not in ("exited", "dead")))
    if after is None and before.status in ("running", "restarting", "paused"):
        exited = True  # stopped and removed within one batch
    if ended:
        exit_code, oom_killed = after.exit_code, after.oom_killed
    else:
        exit_code, oom_killed = _exit_code(died[-1] if died else {}), "oom" in actions
    restarted = started and before is not None and before.started > 0
    if started and not ended:  # it ended first, if at all, then started again
        if exited:
            line("exited", exit_code=exit_code, oom_killed=oom_killed)
        line("restarted" if restarted else "started")
    else:  # it started first, if at all, then ended
        if started:
            line("restarted" if restarted else "started")
        if exited:
            line("exited", exit_code=exit_code, oom_killed=oom_killed)
    if after is None:
        line("removed")
    return lines


def _exit_code(die: dict[str, Any]) -> int | None:
    """The exit code the engine's die event carries."""
    try:
        return int(((die.get("Actor") or {}).get("Attributes") or {})["exitCode"])
    except (KeyError, TypeError, ValueError):
        return None


def gpu_change(action: str, view_object: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "gpu", "action": action, "object": view_object}


def node_change(action: str, drain: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "node", "action": action, "object": drain}
