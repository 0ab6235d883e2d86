"""What every command of the CLI shares: the exit codes, the one-line failure, the configuration
as the agent reads it (with what `make run` fills in) and the printing of tables and JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .. import client as api
from ..config import Config, ConfigError, load_config, prepare_state_dir
from ..node.state_dir import RunningAgent, running_agent

PROG = "utopia-agent"
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_UNAVAILABLE = 7
EXIT_BY_ERROR: dict[type[api.ApiError], int] = {
    api.Unauthorized: EXIT_UNAUTHORIZED,
    api.ReadOnlyToken: EXIT_UNAUTHORIZED,
    api.NotFound: EXIT_NOT_FOUND,
    api.Conflict: EXIT_CONFLICT,
    api.EngineUnavailable: EXIT_UNAVAILABLE,
    api.TooManyFollowers: EXIT_UNAVAILABLE,
    api.TooManyExecSessions: EXIT_UNAVAILABLE,
}
DEFAULT_PORT = 8600
# `check` warns of a certificate that expires sooner (the alert UtopiaCertificateExpiring fires at 7).
CERTIFICATE_WARNING_DAYS = 14
SERVE_FILES = ("gunicorn.conf.py", "wsgi.py")
# Where `make run` keeps its token and (not as root) its state dir, in the checkout.
MAKE_RUN_DIR = ".run"


class CheckFailed(Exception):
    """One step failed; the message is the one line the operator sees, the code the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def route_logs() -> None:
    """Keep the agent's own log lines from repeating the one-line reasons printed here.

    Only the GPU module's notes (say, why `auto` found no NVML) are shown, on stderr.
    """
    agent = logging.getLogger("utopia_agent")
    agent.addHandler(logging.NullHandler())
    agent.propagate = False
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter(f"{PROG}: note: %(message)s"))
    logging.getLogger("utopia_agent.gpus").addHandler(notes)


def with_make_run_defaults(env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """`env` with what `make run` fills in where it is unset, and a note for each filled in.

    Only in a checkout (a directory with the Makefile and gunicorn.conf.py) where `make run`
    made its `.run/`; elsewhere nothing changes.
    """
    env = dict(env)
    notes: list[str] = []
    checkout = Path.cwd()
    run_dir = checkout / MAKE_RUN_DIR
    if not all((checkout / name).is_file() for name in ("Makefile", SERVE_FILES[0])) or not run_dir.is_dir():
        return env, notes
    token_file = run_dir / "token"
    if not env.get("UTOPIA_AGENT_TOKEN") and not env.get("UTOPIA_AGENT_TOKEN_FILE") and token_file.is_file():
        env["UTOPIA_AGENT_TOKEN_FILE"] = str(token_file)
        notes.append(f"token file {token_file}")
    state_dir = run_dir / "state"
    if not env.get("UTOPIA_AGENT_STATE_DIR") and os.geteuid() != 0 and state_dir.is_dir():
        env["UTOPIA_AGENT_STATE_DIR"] = str(state_dir)
        notes.append(f"state dir {state_dir}")
    return env, notes


def agent_config(env: dict[str, str] | None = None) -> tuple[Config, RunningAgent | None]:
    """The agent's configuration, with its state dir made (the engine layer keeps a file there),
    and the agent that runs on that state dir, if one does (whose GPU backend it then uses)."""
    env, notes = with_make_run_defaults(dict(os.environ) if env is None else env)
    if notes:
        print(f"{PROG}: note: as `make run` does, using the {' and the '.join(notes)}", file=sys.stderr)
    try:
        config = load_config(env)
        prepare_state_dir(config)
    except ConfigError as error:
        raise CheckFailed(f"configuration error: {error}", EXIT_CONFIG) from None
    agent = running_agent(config.state_dir)
    if agent and not env.get("UTOPIA_AGENT_GPU_BACKEND"):
        config = dataclasses.replace(config, gpu_backend=agent.gpu_backend, fake_gpu_count=agent.fake_gpu_count)
    return config, agent


def print_table(rows: list[list[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=lambda record: dataclasses.asdict(record)))
