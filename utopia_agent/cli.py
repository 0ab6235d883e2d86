"""`utopia-agent`: what an operator types, on a node or from a laptop.

On the node, around the agent:

    utopia-agent check   configuration, engine and GPUs, as the agent will see them at start
    utopia-agent serve   exec gunicorn with the shipped gunicorn.conf.py

Through the agent's API (utopia_agent.client), at --url (default: UTOPIA_AGENT_BIND, with a
wildcard address read as 127.0.0.1) with the token of --token-file (default:
UTOPIA_AGENT_TOKEN, else UTOPIA_AGENT_TOKEN_FILE):

    utopia-agent ps [--claim C]          the managed containers
    utopia-agent show ID                 one container
    utopia-agent logs [-f] ID            its output
    utopia-agent rm ID...                stop and remove
    utopia-agent gpus [--local]          every GPU with its state and claim (--local, no token, or an
                                         agent that cannot be asked: read from NVML and the engine here)
    utopia-agent quarantine UUID --reason R | release UUID
    utopia-agent node                    the node's versions, hardware and drain state
    utopia-agent drain --reason R | resume
    utopia-agent events [-f] [--since R] the node's changes (the last 20, those after R, with -f each new one)

Each prints a table (or `key: value` lines) by default and JSON with --json, and never
prints the token. Exit codes tell failures apart, each with one line on stderr that says why:

    0  done
    1  failed: the engine or the GPUs (check, gpus --local), or the agent refused or failed
       the request (400, 403, 413, 500, 502)
    2  usage or configuration error (the code gunicorn.conf.py uses), or no token to send
    3  the agent did not answer (refused, timed out) or answered outside the contract
    4  the agent refused the token (401)
    5  no such container or GPU (404)
    6  conflict with the node's state (409: the claim exists, no GPUs free, a port taken,
       the node draining, a GPU held)
    7  the agent is unavailable: its engine is down (503, after the client's retries) or too
       many log followers (429); try again later

Each reads the same UTOPIA_AGENT_* environment as the agent, prints plain text and never
prints the token. Run from a checkout where `make run` runs, they fill in what `make run`
fills in (the token file .run/token and, not as root, the state dir .run/state) when the
environment does not say; and where an agent holds the state dir, they use its GPU backend
unless UTOPIA_AGENT_GPU_BACKEND says otherwise, so they describe the agent that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from . import client as api
from .config import Config, ConfigError, load_config, prepare_state_dir
from .engine.manager import DockerManager
from .errors import EngineUnavailable
from .gpus.inventory import GpuBackendError, GpuInventory, GpuStatus, make_inventory
from .claims.holders import claims_on
from .claims.records import Holdings
from .node.state_dir import RunningAgent, running_agent

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
    api.NotFound: EXIT_NOT_FOUND,
    api.Conflict: EXIT_CONFLICT,
    api.EngineUnavailable: EXIT_UNAVAILABLE,
    api.TooManyFollowers: EXIT_UNAVAILABLE,
}
DEFAULT_PORT = 8600
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


def _gpu_rows(gpus: list[GpuStatus], holdings: list[Holdings] | None) -> list[list[str]]:
    """Table rows; without `holdings` (engine down) the claim column says '?' rather than '-'."""
    rows = [["GPU", "UUID", "NAME", "MEMORY", "TEMP", "HEALTH", "CLAIM"]]
    for gpu in gpus:
        claim = "?" if holdings is None else ",".join(claims_on(gpu, holdings)) or "-"
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
        print(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


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
        _print_table([row[:-1] for row in _gpu_rows(gpus, [])], indent="  ")
    return 0


def cmd_local_gpus(args: argparse.Namespace) -> int:
    """The GPU table with each GPU's claim, from NVML and the managed containers' labels.

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
    holdings: list[Holdings] | None
    try:
        holdings = [container.holdings for container in docker.list_managed()]
    except EngineUnavailable as error:
        holdings = None
        print(f"{PROG}: {error.message} at {_engine_location()}; claims unknown", file=sys.stderr)
    finally:
        docker.close()

    if args.json:
        _print_json([{
            "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "healthy": gpu.healthy,
            "memory_used_mb": gpu.memory_used_mb, "memory_total_mb": gpu.memory_total_mb,
            "temperature_c": gpu.temperature_c,
            "claims": None if holdings is None else claims_on(gpu, holdings),
        } for gpu in gpus])
    else:
        print(f"gpus: {len(gpus)} found (backend {inventory.backend})")
        if gpus:
            _print_table(_gpu_rows(gpus, holdings))
    return 0 if holdings is not None else EXIT_FAILED


# --------------------------------------------------------------------------- through the API


def agent_url(env: dict[str, str]) -> str:
    """The agent's URL from UTOPIA_AGENT_BIND, as the agent binds it; a wildcard address is reached on loopback."""
    bind = env.get("UTOPIA_AGENT_BIND") or f"0.0.0.0:{DEFAULT_PORT}"
    if bind.startswith(("unix:", "fd:")):
        raise CheckFailed(f"UTOPIA_AGENT_BIND={bind} is not a TCP address; pass --url", EXIT_CONFIG)
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        host, port = bind, str(DEFAULT_PORT)
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"http://{host}:{port}"


def agent_token(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """The token to send: --token-file, else UTOPIA_AGENT_TOKEN, else UTOPIA_AGENT_TOKEN_FILE; None without one."""
    path = args.token_file or (None if env.get("UTOPIA_AGENT_TOKEN") else env.get("UTOPIA_AGENT_TOKEN_FILE"))
    if not path:
        return env.get("UTOPIA_AGENT_TOKEN") or None
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise CheckFailed(f"cannot read the token file {path}: {error.strerror}", EXIT_CONFIG) from None
    if not token:
        raise CheckFailed(f"the token file {path} is empty", EXIT_CONFIG)
    return token


def agent_client(args: argparse.Namespace, env: dict[str, str] | None = None) -> api.AgentClient:
    env = with_make_run_defaults(dict(os.environ))[0] if env is None else env
    token = agent_token(args, env)
    if token is None:
        raise CheckFailed("no token: pass --token-file, or set UTOPIA_AGENT_TOKEN or UTOPIA_AGENT_TOKEN_FILE", EXIT_CONFIG)
    # An operator at a terminal would rather see an outage than wait out an orchestrator's retries.
    return api.AgentClient(args.url or agent_url(env), token=token, retries=1, max_retry_wait=2.0)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=lambda record: dataclasses.asdict(record)))


def _since(seconds: int) -> str:
    """How long ago a Unix time was, as `docker ps` says it; '-' for never."""
    if not seconds:
        return "-"
    ago = max(0, int(time.time()) - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= size:
            return f"{ago // size}{unit} ago"
    return f"{ago}s ago"


def _status(container: api.Container) -> str:
    if container.status != "exited" or container.exit_code is None:
        return container.status
    return f"exited ({'oom' if container.oom_killed else container.exit_code})"


def _ports(container: api.Container) -> str:
    mappings = sorted(container.port_mappings, key=lambda m: (m.host_port, m.protocol))
    return ",".join(f"{m.host_port}->{m.container_port}/{m.protocol}" for m in mappings) or "-"


def _ids(values: Iterable[int]) -> str:
    return ",".join(map(str, values)) or "-"


def cmd_ps(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        containers = sorted(client.list(claim_id=args.claim), key=lambda c: c.created, reverse=True)
    if args.json:
        _print_json(containers)
        return 0
    rows = [["CONTAINER", "CLAIM", "IMAGE", "STATUS", "GPUS", "PORTS", "CREATED"]]
    rows += [[c.id[:12], c.claim_id, c.image, _status(c), _ids(c.gpu_ids), _ports(c), _since(c.created)] for c in containers]
    _print_table(rows)
    return 0


def _print_fields(values: dict[str, Any]) -> None:
    """`key: value` lines; a nested value as one line of JSON."""
    width = max(map(len, values), default=0)
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"{key + ':':<{width + 1}} {text}")


def cmd_show(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        container = client.get(args.container)
    if args.json:
        _print_json(container)
        return 0
    fields = dataclasses.asdict(container)
    fields.update(status=_status(container), gpu_ids=_ids(container.gpu_ids), ports=_ports(container),
                  created=f"{container.created} ({_since(container.created)})",
                  started=f"{container.started} ({_since(container.started)})")
    _print_fields(fields)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    options = {"tail": args.tail, "since": args.since, "timestamps": args.timestamps}
    with agent_client(args) as client:
        if not args.follow:
            sys.stdout.write(client.logs(args.container, **options))
            return 0
        for text in client.follow_logs(args.container, **options):
            sys.stdout.write(text)
            sys.stdout.flush()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        for container in args.containers:
            client.delete(container)
            print(json.dumps({"deleted": container}) if args.json else container)
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    """The agent's view of its GPUs (state, claim, quarantine reason); the node's own reading
    (cmd_local_gpus) with --local, without a token, or when the agent cannot be asked."""
    env = with_make_run_defaults(dict(os.environ))[0]
    if args.local or agent_token(args, env) is None:
        return cmd_local_gpus(args)
    try:
        with agent_client(args, env) as client:
            gpus = client.gpus()
    except api.NotFound:
        print(f"{PROG}: note: the agent cannot list its GPUs (it predates GET /api/v1/gpus); reading them on this node", file=sys.stderr)
        return cmd_local_gpus(args)
    except api.AgentUnreachable as error:
        print(f"{PROG}: note: the agent cannot list its GPUs ({error}); reading them on this node", file=sys.stderr)
        return cmd_local_gpus(args)
    if args.json:
        _print_json(gpus)
        return 0
    rows = [["GPU", "UUID", "NAME", "STATE", "CLAIM", "REASON"]]
    rows += [[str(g.index), g.uuid or "?", g.name or "?", g.state, g.claim_id or "-", g.reason or "-"] for g in gpus]
    _print_table(rows)
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        client.quarantine(args.uuid, args.reason)
    print(json.dumps({"quarantined": args.uuid}) if args.json else f"{args.uuid}: quarantined")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        client.release(args.uuid)
    print(json.dumps({"released": args.uuid}) if args.json else f"{args.uuid}: released")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        node = client.node()
    if args.json:
        _print_json(node)
    else:
        _print_fields(node)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        client.drain(args.reason)
    print(json.dumps({"draining": True}) if args.json else "draining: the node takes no new claims until `resume`")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        client.resume()
    print(json.dumps({"draining": False}) if args.json else "resumed: the node takes new claims")
    return 0


# Without -f and --since, `events` prints this many of the last changes.
RECENT_EVENTS = 20


def cmd_events(args: argparse.Namespace) -> int:
    """The node's changes: the recent ones (or those after --since), and with -f each new one as it comes."""
    with agent_client(args) as client:
        last = client.revision()
        since = args.since if args.since is not None else last if args.follow else max(0, last - RECENT_EVENTS)
        if not args.follow and since == last:
            return 0
        for change in client.watch(since=since):
            print(json.dumps(change) if args.json else _event_line(change), flush=True)
            if not args.follow and change.get("revision", 0) >= last:
                break
    return 0


def _event_line(change: dict[str, Any]) -> str:
    """`REVISION TIME KIND ACTION WHAT`: a container by claim and short id, a GPU by index and UUID, the drain by reason."""
    if change["kind"] == "relist":
        return f"{change['revision']:>8} relisted: the agent no longer held the changes asked for ({len(change['containers'])} containers now)"
    shown = change.get("object") or {}
    when = time.strftime("%H:%M:%S", time.localtime(change["time"]))
    if change["kind"] == "container":
        what = f"{shown.get('claim_id', '-')} ({str(shown.get('id', ''))[:12]})"
        if change["action"] == "exited":
            what += " oom-killed" if change.get("oom_killed") else f" exit {change.get('exit_code')}"
    elif change["kind"] == "gpu":
        what = f"gpu {shown.get('index')} {shown.get('uuid')}" + (f": {shown['reason']}" if shown.get("reason") else "")
    else:
        what = shown.get("reason") or "-"
    return f"{change['revision']:>8} {when} {change['kind']:<9} {change['action']:<11} {what}"


def api_failure(error: api.AgentClientError) -> CheckFailed:
    """The one line and exit code of a failed API call."""
    if not isinstance(error, api.ApiError):
        return CheckFailed(str(error), EXIT_UNREACHABLE)
    details = ""
    if isinstance(error, api.InvalidRequest) and error.errors:
        details = " (" + "; ".join(f"{field}: {messages}" for field, messages in error.errors.items()) + ")"
    elif isinstance(error, api.ClaimExists) and error.container_id:
        details = f" (container {error.container_id[:12]})"
    code = next((code for cls, code in EXIT_BY_ERROR.items() if isinstance(error, cls)), EXIT_FAILED)
    return CheckFailed(f"{error.status_code} {error.error}: {error.message}{details}", code)


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


def cmd_serve(args: argparse.Namespace) -> NoReturn:
    """Replace this process by gunicorn, so a supervisor's signals reach the master directly."""
    root = serve_root(args.root)
    os.chdir(root)
    argv = [sys.executable, "-m", "gunicorn", "-c", str(root / "gunicorn.conf.py"), "wsgi:app"]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def _api_command(commands, name: str, run: Callable[[argparse.Namespace], int], help_text: str,
                 connection: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                  parents=[connection])
    command.set_defaults(run=run)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The Utopia node agent's operator commands.",
        epilog="Exit codes: 0 done, 1 failed, 2 usage or configuration, 3 agent unreachable, 4 token refused, "
               "5 not found, 6 conflict, 7 unavailable (retry later).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help="the agent, e.g. http://gpu-node-1:8600 (default: from UTOPIA_AGENT_BIND)")
    connection.add_argument("--token-file", help="file holding the token (default: UTOPIA_AGENT_TOKEN, UTOPIA_AGENT_TOKEN_FILE)")
    connection.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "check", help="check configuration, engine and GPUs (run before starting the agent)",
        description="Check the configuration, reach the Docker engine and load the GPU inventory.",
    ).set_defaults(run=cmd_check)
    ps = _api_command(commands, "ps", cmd_ps, "list the managed containers, newest first", connection)
    ps.add_argument("--claim", help="only the container of this claim")
    show = _api_command(commands, "show", cmd_show, "show one container", connection)
    show.add_argument("container", help="container id or a unique prefix of 12 or more hex digits")
    logs = _api_command(commands, "logs", cmd_logs, "print a container's output", connection)
    logs.add_argument("container", help="container id or a unique prefix of 12 or more hex digits")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing until the container stops or the agent ends the stream")
    logs.add_argument("--tail", type=int, help="only the last N lines (the agent's default: 100)")
    logs.add_argument("--since", type=int, help="only lines since this Unix time")
    logs.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    rm = _api_command(commands, "rm", cmd_rm, "stop and remove containers, freeing their GPUs and ports", connection)
    rm.add_argument("containers", nargs="+", metavar="container", help="container id or a unique prefix")
    gpus = _api_command(commands, "gpus", cmd_gpus, "list the GPUs with their state and the claim holding each", connection)
    gpus.add_argument("--local", action="store_true",
                      help="read NVML and the engine on this node instead of asking the agent ('-' free, '?' engine unreachable)")
    quarantine = _api_command(commands, "quarantine", cmd_quarantine, "never give a GPU again until it is released", connection)
    quarantine.add_argument("uuid", help="the GPU's UUID")
    quarantine.add_argument("--reason", required=True, help="why, for the next operator")
    release = _api_command(commands, "release", cmd_release, "lift a GPU's quarantine", connection)
    release.add_argument("uuid", help="the GPU's UUID")
    _api_command(commands, "node", cmd_node, "show the node: versions, CPUs, memory, GPU topology, drain state", connection)
    drain = _api_command(commands, "drain", cmd_drain, "take no new claims until resumed (running claims go on)", connection)
    drain.add_argument("--reason", required=True, help="why, for the next operator")
    _api_command(commands, "resume", cmd_resume, "take new claims again after a drain", connection)
    events = _api_command(commands, "events", cmd_events, "print the node's changes: containers, GPUs, the drain", connection)
    events.add_argument("-f", "--follow", action="store_true", help="go on printing each change as it comes")
    events.add_argument("--since", type=int, metavar="R",
                        help=f"the changes after revision R (default: the last {RECENT_EVENTS}, or with -f only new ones)")
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
        try:
            return args.run(args)
        except api.AgentClientError as error:
            raise api_failure(error) from None
    except KeyboardInterrupt:
        return 130
    except CheckFailed as failure:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
