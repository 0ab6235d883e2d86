"""What a change of a container, a GPU or the drain is as a line of the history (without its revision).

A container's change is told from two inspects of it (the node view's record before and after)
and the engine's events in between: the view inspects a container once per batch of its events,
so a create and a start, or an exit and a restart, may come as one change of record.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..claims.records import CLAIM_LABEL, ContainerState, ManagedContainer
from ..schemas import ContainerSchema

_container = ContainerSchema()


def container_object(state: ContainerState) -> dict[str, Any]:
    """The container as GET /api/v1/containers/<id> shows it."""
    return _container.dump(ManagedContainer.from_state(state))


def container_changes(before: ContainerState | None, after: ContainerState | None, engine_actions: list[dict[str, Any]],
                      exit_told: bool = False) -> list[dict[str, Any]]:
    """The history's lines for one container whose record went from `before` to `after`.

    `engine_actions` are the engine's events for it in this batch (their `Action` and
    `Actor.Attributes`): a die's exit code is taken from there when the record no longer shows
    it (the container restarted, or was removed, since). `exit_told`: the exit is in the history
    already (see `exit_line`), so it is not told again."""
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
    # A container the engine is about to restart ("restarting") has not started yet: its start comes with its own event.
    started = after is not None and after.started > 0 and after.status != "restarting" and (
        before is None or "start" in actions or after.started != before.started or after.restart_count != before.restart_count
    )
    ended = after is not None and after.status in ("exited", "dead")
    exited = bool(died) or (ended and (before is None or after.finished != before.finished or before.status not in ("exited", "dead")))
    if after is None and before.status in ("running", "restarting", "paused"):
        exited = True  # stopped and removed within one batch
    exited = exited and not exit_told
    if ended:
        exit_code, oom_killed = after.exit_code, after.oom_killed
    else:
        exit_code, oom_killed = _exit_code(died[-1] if died else {}), "oom" in actions
    # Restarted by the engine's restart policy (its count grows); a start asked of the engine (the
    # agent's start of a stopped claim, which resets the count) is `started`.
    restarted = started and before is not None and before.started > 0 and (
        after.restart_count > before.restart_count or before.status == "restarting")
    why = _stop_reason(after) if after is not None else {}
    if started and not ended:  # it ended first, if at all, then started again
        if exited:
            line("exited", exit_code=exit_code, oom_killed=oom_killed)
        line("restarted" if restarted else "started")
    else:  # it started first, if at all, then ended
        if started:
            line("restarted" if restarted else "started")
        if exited:
            line("exited", exit_code=exit_code, oom_killed=oom_killed, **why)
    if after is not None and _stopped(after) and (before is None or not _stopped(before)):
        line("stopped")
    if after is None:
        line("removed")
    return lines


def _stop_reason(state: ContainerState) -> dict[str, str]:
    """`reason` for the exited line of a claim the agent stopped (`requested`, `disk_limit_exceeded`, ...); nothing for any other exit."""
    reason = ManagedContainer.from_state(state).stop_reason
    return {"reason": reason} if reason is not None else {}


def _stopped(state: ContainerState) -> bool:
    """Stopped by the agent (its name carries the mark, and it no longer runs)."""
    return ManagedContainer.from_state(state).stopped


def exit_line(before: ContainerState, engine_actions: list[dict[str, Any]], oom_seen: bool = False) -> dict[str, Any] | None:
    """The `exited` line of a running container the engine says died, told from the engine's event alone.

    The engine sends `die` before it has cleaned up after the process (network, mounts), and
    answers an inspect of the container only once it has: tens of milliseconds at times. So the
    exit goes to the history at once, as the last record with the die's code and time, and the
    inspect that follows refines the record without telling the exit again. None when there is
    no die, or the container was not known running. `oom_seen`: the engine's `oom` came in an earlier batch."""
    died = [event for event in engine_actions if event.get("Action") == "die"]
    if not died or before.status not in ("running", "restarting", "paused"):
        return None
    exit_code, oom_killed = _exit_code(died[-1]), oom_seen or any(event.get("Action") == "oom" for event in engine_actions)
    finished = int(died[-1].get("time") or 0) or before.finished
    exited = replace(before, status="exited", exit_code=exit_code or 0, oom_killed=oom_killed, finished=finished)
    return {"kind": "container", "action": "exited", "exit_code": exit_code, "oom_killed": oom_killed, **_stop_reason(exited),
            "object": container_object(exited)}


def _exit_code(die: dict[str, Any]) -> int | None:
    """The exit code the engine's die event carries."""
    try:
        return int(((die.get("Actor") or {}).get("Attributes") or {})["exitCode"])
    except (KeyError, TypeError, ValueError):
        return None


def gpu_change(action: str, view_object: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "gpu", "action": action, "object": view_object}


def volume_change(action: str, volume_object: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "volume", "action": action, "object": volume_object}


def node_change(action: str, drain: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "node", "action": action, "object": drain}


def exec_change(session: dict[str, Any]) -> dict[str, Any]:
    """An exec session that ended: its claim, container, the command's first word, how long, its exit code and how it ended."""
    return {"kind": "exec", "action": "ended", "object": session}
