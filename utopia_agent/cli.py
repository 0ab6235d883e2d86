"""`utopia-agent`: what an operator runs on a node around the agent itself.

    utopia-agent check   configuration, engine and GPUs, as the agent will see them at start
    utopia-agent gpus    every GPU with the claim that holds it
    utopia-agent serve   exec gunicorn with the shipped gunicorn.conf.py

Each reads the same UTOPIA_AGENT_* environment as the agent, prints plain text and never
prints the token. Run from a checkout where `make run` runs, they fill in what `make run`
fills in (the token file .run/token and, not as root, the state dir .run/state) when the
environment does not say; and where an agent holds the state dir, they use its GPU backend
unless UTOPIA_AGENT_GPU_BACKEND says otherwise, so they describe the agent that runs. `check` and `gpus` exit 0 when all is well, 1 when the engine or the GPUs
fail, and 2 on a configuration error (the code gunicorn.conf.py uses), each failure with
one line on stderr that says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import Config, ConfigError, load_config, prepare_state_dir
from .docker_manager import DockerManager
from .errors import EngineUnavailable
from .gpus import GpuBackendError, GpuInventory, GpuStatus, gpu_keys, make_inventory
from .state_dir import RunningAgent, running_agent

PROG = "utopia-agent"
EXIT_FAILED = 1
EXIT_CONFIG = 2
SERVE_FILES = ("gunicorn.conf.py", "wsgi.py")
# Where `make run` keeps its token and (not as root) its state dir, in the checkout.
MAKE_RUN_DIR = ".run"


class CheckFailed(Exception):
    """One step failed; the message is the one line the operator sees, the code the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _route_logs() -> None:
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


def _config(env: dict[str, str] | None = None) -> tuple[Config, RunningAgent | None]:
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


def _describe_agent(agent: RunningAgent | None) -> str:
    if agent is None:
        return "agent: none running on this state dir"
    return f"agent: running, {agent.describe()} (GPU backend {agent.gpu_backend})"


def _inventory(config: Config) -> GpuInventory:
    try:
        return make_inventory(config.gpu_backend, config.fake_gpu_count)
    except GpuBackendError as error:
        raise CheckFailed(f"GPU backend {config.gpu_backend}: {error}") from None


def _engine_location() -> str:
    return os.environ.get("DOCKER_HOST") or "the local socket"


def _mib(used: int | None, total: int | None) -> str:
    return f"{'?' if used is None else used}/{'?' if total is None else total} MiB"


def _gpu_rows(gpus: list[GpuStatus], claims: dict[str, list[str]] | None) -> list[list[str]]:
    """Table rows; without `claims` (engine down) the claim column says '?' rather than '-'."""
    rows = [["GPU", "UUID", "NAME", "MEMORY", "TEMP", "HEALTH", "CLAIM"]]
    for gpu in gpus:
        claim = "?" if claims is None else ",".join(claims.get(gpu.uuid, []) + claims.get(f"#{gpu.index}", [])) or "-"
        rows.append([
            str(gpu.index),
            gpu.uuid or "?",
            gpu.name or "?",
            _mib(gpu.memory_used_mb, gpu.memory_total_mb),
            "?" if gpu.temperature_c is None else f"{gpu.temperature_c}C",
            "healthy" if gpu.healthy else "FAILED",
            claim,
        ])
    return rows


def _print_table(rows: list[list[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_check(args: argparse.Namespace) -> int:
    """Everything the agent needs at start, in the order it needs it; stop at the first failure."""
    config, agent = _config()
    print(f"config: ok (bind {config.bind}, {config.workers} workers, state dir {config.state_dir}, "
          f"GPU backend {config.gpu_backend})")
    print(_describe_agent(agent))

    docker = DockerManager(config)
    try:
        docker.ping()
        version = docker.engine_version()
    except EngineUnavailable as error:
        raise CheckFailed(f"{error.message} at {_engine_location()}") from None
    finally:
        docker.close()
    print(f"engine: ok, Docker {version} at {_engine_location()}")

    inventory = _inventory(config)
    try:
        gpus = inventory.snapshot()
    finally:
        inventory.close()
    failed = sum(not gpu.healthy for gpu in gpus)
    print(f"gpus: {len(gpus)} found (backend {inventory.backend})" + (f", {failed} failed and never allocated" if failed else ""))
    if gpus:
        _print_table([row[:-1] for row in _gpu_rows(gpus, {})], indent="  ")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    """The GPU table with each GPU's claim, from the managed containers' labels.

    Reading GPUs and labels needs no token, so a missing one is filled in here and `gpus`
    works from an operator's shell that lacks the agent's token file.
    """
    env = dict(os.environ)
    env.pop("UTOPIA_AGENT_TOKEN_FILE", None)
    env["UTOPIA_AGENT_TOKEN"] = "unused-by-the-gpus-command"
    config, _ = _config(env)
    inventory = _inventory(config)
    try:
        gpus = inventory.snapshot()
    finally:
        inventory.close()

    docker = DockerManager(config)
    claims: dict[str, list[str]] | None = {}
    try:
        for container in docker.list_managed():
            for key in gpu_keys(container):
                claims.setdefault(key, []).append(container.claim_id)
    except EngineUnavailable as error:
        claims = None
        print(f"{PROG}: {error.message} at {_engine_location()}; claims unknown", file=sys.stderr)
    finally:
        docker.close()

    print(f"gpus: {len(gpus)} found (backend {inventory.backend})")
    if gpus:
        _print_table(_gpu_rows(gpus, claims))
    return 0 if claims is not None else EXIT_FAILED


def serve_root(explicit: str | None = None) -> Path:
    """The checkout holding gunicorn.conf.py and wsgi.py (neither is part of the installed package).

    Looked for, in order: --root; the directory above the package (a checkout, or an
    editable install of one); the current directory (as supervisord's `directory=` sets it);
    the directory above the virtualenv (`/opt/utopia-agent` for `/opt/utopia-agent/.venv`).
    """
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(__file__).resolve().parents[1], Path.cwd(), Path(sys.prefix).resolve().parent]
    for root in candidates:
        if all((root / name).is_file() for name in SERVE_FILES):
            return root
    tried = ", ".join(str(root) for root in candidates)
    raise CheckFailed(f"no {' and '.join(SERVE_FILES)} in {tried}; run from the agent's checkout or pass --root")


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process by gunicorn, so a supervisor's signals reach the master directly."""
    root = serve_root(args.root)
    os.chdir(root)
    argv = [sys.executable, "-m", "gunicorn", "-c", str(root / "gunicorn.conf.py"), "wsgi:app"]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return EXIT_FAILED  # only reached when execv is mocked


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The Utopia node agent's operator commands.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "check", help="check configuration, engine and GPUs (run before starting the agent)",
        description="Check the configuration, reach the Docker engine and load the GPU inventory.",
    ).set_defaults(run=cmd_check)
    commands.add_parser(
        "gpus", help="list the GPUs with the claim holding each",
        description="List the GPUs with the claim that holds each ('-' free, '?' engine unreachable).",
    ).set_defaults(run=cmd_gpus)
    serve = commands.add_parser(
        "serve", help="start the agent: exec gunicorn with the shipped gunicorn.conf.py",
        description="Exec `gunicorn -c <root>/gunicorn.conf.py wsgi:app` from the agent's checkout.",
    )
    serve.add_argument("--root", help="the checkout holding gunicorn.conf.py and wsgi.py")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _route_logs()
    try:
        return args.run(args)
    except CheckFailed as failure:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
