"""`utopia-agent`: what an operator types, on a node or from a laptop.

On the node, around the agent:

    utopia-agent check   configuration, engine and GPUs, as the agent will see them at start
    utopia-agent serve   exec gunicorn with the shipped gunicorn.conf.py

Through the agent's API (utopia_agent.client), at --url (default: UTOPIA_AGENT_BIND, with a
wildcard address read as 127.0.0.1, over https when UTOPIA_AGENT_TLS_CERT_FILE is set) with the
token of --token-file (default: UTOPIA_AGENT_TOKEN, else UTOPIA_AGENT_TOKEN_FILE); over HTTPS,
trusting the CA of --ca-file (UTOPIA_AGENT_CA_FILE; default: the system's CAs) and presenting
the client certificate of --cert-file and --key-file (UTOPIA_AGENT_CLIENT_CERT_FILE,
UTOPIA_AGENT_CLIENT_KEY_FILE) where the agent asks for one:

    utopia-agent ps [--claim C]          the managed containers
    utopia-agent show ID                 one container
    utopia-agent logs [-f] ID            its output
    utopia-agent exec [-i] [-t] ID -- CMD...  run a command in it (exit code: the command's)
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
    4  the agent refused the token (401), or the read-only token for a change (403 read_only_token)
    5  no such container or GPU (404)
    6  conflict with the node's state (409: the claim exists, no GPUs free, a port taken,
       the node draining, a GPU held)
    7  the agent is unavailable: its engine is down (503, after the client's retries) or too
       many log followers or exec sessions (429); try again later

`exec` exits with the command's own code instead, once the command ran.

Each reads the same UTOPIA_AGENT_* environment as the agent, prints plain text and never
prints the token. Run from a checkout where `make run` runs, they fill in what `make run`
fills in (the token file .run/token and, not as root, the state dir .run/state) when the
environment does not say; and where an agent holds the state dir, they use its GPU backend
unless UTOPIA_AGENT_GPU_BACKEND says otherwise, so they describe the agent that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .. import __version__
from .. import client as api
from .common import (
    DEFAULT_PORT,
    EXIT_BY_ERROR,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    PROG,
    SERVE_FILES,
    CheckFailed,
    print_json,
    print_table,
    route_logs,
    with_make_run_defaults,
)
from ..config import CERT_VARIABLE
from .exec import run_exec
from .node import cmd_check, cmd_local_gpus

T = TypeVar("T")


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
    scheme = "https" if env.get(CERT_VARIABLE) else "http"
    return f"{scheme}://{host}:{port}"


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
    ca_file = args.ca_file or env.get("UTOPIA_AGENT_CA_FILE") or None
    cert_file = args.cert_file or env.get("UTOPIA_AGENT_CLIENT_CERT_FILE") or None
    key_file = args.key_file or env.get("UTOPIA_AGENT_CLIENT_KEY_FILE") or None
    if (cert_file is None) != (key_file is None):
        raise CheckFailed("a client certificate needs both --cert-file and --key-file", EXIT_CONFIG)
    for path in (ca_file, cert_file, key_file):
        if path is not None and not os.access(path, os.R_OK):
            raise CheckFailed(f"cannot read {path}", EXIT_CONFIG)
    # An operator at a terminal would rather see an outage than wait out an orchestrator's retries.
    return api.AgentClient(args.url or agent_url(env), token=token, retries=1, max_retry_wait=2.0,
                           ca_file=ca_file, client_cert=(cert_file, key_file) if cert_file else None)


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
    if container.stopped:
        return "stopped" if container.error in ("", None) else f"stopped ({container.error})"
    if container.status != "exited" or container.exit_code is None:
        return container.status
    return f"exited ({'oom' if container.oom_killed else container.exit_code})"


def _ports(container: api.Container) -> str:
    mappings = sorted(container.port_mappings, key=lambda m: (m.host_port, m.protocol))
    return ",".join(f"{m.host_port}->{m.container_port}/{m.protocol}" for m in mappings) or "-"


def _ids(values: Iterable[int]) -> str:
    return ",".join(map(str, values)) or "-"


def _answer(args: argparse.Namespace, ask: Callable[[api.AgentClient], T], render: Callable[[T], None]) -> int:
    """Ask the agent, then print its answer: as JSON with --json, else as `render` writes it for a person."""
    with agent_client(args) as client:
        answer = ask(client)
    if args.json:
        print_json(answer)
    else:
        render(answer)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    return _answer(args, lambda client: sorted(client.list(claim_id=args.claim), key=lambda c: c.created, reverse=True), _print_containers)


def _print_containers(containers: list[api.Container]) -> None:
    rows = [["CONTAINER", "CLAIM", "IMAGE", "STATUS", "GPUS", "PORTS", "CREATED"]]
    rows += [[c.id[:12], c.claim_id, c.image, _status(c), _ids(c.gpu_ids), _ports(c), _since(c.created)] for c in containers]
    print_table(rows)


def _each(args: argparse.Namespace, names: list[str], remove: Callable[[str], object], done: str) -> int:
    """Remove each in turn, saying so as each goes (the first refusal stops the rest)."""
    for name in names:
        remove(name)
        print(json.dumps({done: name}) if args.json else name)
    return 0


def _print_fields(values: dict[str, Any]) -> None:
    """`key: value` lines; a nested value as one line of JSON."""
    width = max(map(len, values), default=0)
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"{key + ':':<{width + 1}} {text}")


def cmd_show(args: argparse.Namespace) -> int:
    return _answer(args, lambda client: client.get(args.container), _print_container)


def _print_container(container: api.Container) -> None:
    fields = dataclasses.asdict(container)
    fields.update(status=_status(container), gpu_ids=_ids(container.gpu_ids), ports=_ports(container),
                  created=f"{container.created} ({_since(container.created)})",
                  started=f"{container.started} ({_since(container.started)})")
    _print_fields(fields)


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


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CheckFailed("no command: utopia-agent exec [-i] [-t] ID -- CMD [ARG...]", EXIT_CONFIG)
    with agent_client(args) as client:
        return run_exec(client, args.container, command, args.interactive, args.tty)


def cmd_rm(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        return _each(args, args.containers, client.delete, "deleted")


def cmd_stop(args: argparse.Namespace) -> int:
    return _stop_or_start(args, api.AgentClient.stop)


def cmd_start(args: argparse.Namespace) -> int:
    return _stop_or_start(args, api.AgentClient.start)


def _stop_or_start(args: argparse.Namespace, action: Callable[[api.AgentClient, str], api.Container]) -> int:
    with agent_client(args) as client:
        for name in args.containers:
            container = action(client, name)
            print(json.dumps({"id": container.id, "status": container.status, "stopped": container.stopped}) if args.json
                  else f"{container.id[:12]} {_status(container)}")
    return 0


def cmd_volumes(args: argparse.Namespace) -> int:
    return _answer(args, api.AgentClient.volumes, _print_volumes)


def _print_volumes(volumes: list[api.Volume]) -> None:
    rows = [["VOLUME", "SIZE", "USED", "BACKEND", "CLAIMS", "CREATED"]]
    for volume in volumes:
        used = f"{volume.used_mb} MB" if volume.used_mb is not None else "-"
        rows.append([volume.name if volume.ready else f"{volume.name} (not ready)", f"{volume.size_gb} GB", used, volume.backend,
                     ",".join(volume.claims) or "-", _since(volume.created)])
    print_table(rows)


def cmd_volume_create(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        volume = client.create_volume(args.name, args.size_gb)
    print(json.dumps({"name": volume.name, "size_gb": volume.size_gb, "backend": volume.backend}) if args.json else volume.name)
    return 0


def cmd_volume_rm(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        return _each(args, args.names, client.delete_volume, "removed")


def cmd_images(args: argparse.Namespace) -> int:
    return _answer(args, api.AgentClient.images, _print_images)


def _print_images(images: list[api.Image]) -> None:
    rows = [["IMAGE", "ID", "SIZE", "ORIGIN", "STATE", "CLAIMS", "LAST USED"]]
    for image in images:
        size = f"{image.size_mb:.0f} MB" if image.size_mb is not None else "-"
        if image.progress is not None and image.state == "pulling":
            size = f"{image.progress.downloaded_bytes / 1e6:.0f}/{image.progress.total_bytes / 1e6:.0f} MB"
        state = f"failed: {image.error}" if image.state == "failed" else image.state
        rows.append([image.image, image.id[7:19] if image.id else "-", size, image.origin, state, ",".join(image.claims) or "-",
                     _since(image.last_used or 0)])
    print_table(rows)


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull ahead; the registry's password comes on stdin (never the command line, which any user may read)."""
    auth = None
    if args.username:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass(f"password for {args.username}: ")
        auth = {"username": args.username, "password": password}
    with agent_client(args) as client:
        image = client.pull(args.image, registry_auth=auth)
    print(json.dumps({"image": image.image, "state": image.state}) if args.json else f"{image.image}: {image.state}")
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    with agent_client(args) as client:
        return _each(args, args.images, client.remove_image, "removed")


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
        print_json(gpus)
        return 0
    rows = [["GPU", "UUID", "NAME", "STATE", "CLAIM", "REASON"]]
    rows += [[str(g.index), g.uuid or "?", g.name or "?", g.state, g.claim_id or "-", g.reason or "-"] for g in gpus]
    print_table(rows)
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
    return _answer(args, api.AgentClient.node, _print_fields)


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
        for change in client.watch(since=since, timeout=args.timeout if args.follow else None):
            print(json.dumps(change) if args.json else _event_line(change), flush=True)
            if not args.follow and change.get("revision", 0) >= last:
                break
    return 0


def _positive_seconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, 1 or more, got {text!r}")
    return int(text)


def _event_line(change: dict[str, Any]) -> str:
    """`REVISION TIME KIND ACTION WHAT`: a container by claim and short id, a GPU by index and UUID, an exec by claim and
    command, the drain by reason, disk pressure by the filesystems short of space."""
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
    elif change["kind"] == "exec":
        what = (f"{shown.get('claim_id', '-')} ({str(shown.get('container_id', ''))[:12]}) {shown.get('command')} {shown.get('mode')} "
                f"exit {shown.get('exit_code')} {shown.get('ended')} after {shown.get('duration')} s")
    elif change["action"].startswith("disk_pressure"):
        what = ", ".join(f"{fs['name']} {fs['path']} {fs['free_percent']}% free" for fs in shown.get("filesystems") or ()) or "-"
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
    connection.add_argument("--url", help="the agent, e.g. https://gpu-node-1:8600 (default: from UTOPIA_AGENT_BIND)")
    connection.add_argument("--token-file", help="file holding the token (default: UTOPIA_AGENT_TOKEN, UTOPIA_AGENT_TOKEN_FILE)")
    connection.add_argument("--ca-file", help="HTTPS: the CA that signed the agent's certificate (default: UTOPIA_AGENT_CA_FILE, else the system's)")
    connection.add_argument("--cert-file", help="HTTPS: a client certificate, for an agent that asks for one (default: UTOPIA_AGENT_CLIENT_CERT_FILE)")
    connection.add_argument("--key-file", help="HTTPS: the client certificate's key (default: UTOPIA_AGENT_CLIENT_KEY_FILE)")
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
    run = _api_command(commands, "exec", cmd_exec, "run a command in a container, as docker exec does", connection)
    run.add_argument("-i", "--interactive", action="store_true", help="pass stdin on to the command")
    run.add_argument("-t", "--tty", action="store_true", help="run it on a terminal: raw keys, the window's size")
    run.add_argument("container", help="container id or a unique prefix of 12 or more hex digits")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments")
    rm = _api_command(commands, "rm", cmd_rm, "stop and remove containers, freeing their GPUs and ports", connection)
    rm.add_argument("containers", nargs="+", metavar="container", help="container id or a unique prefix")
    stop = _api_command(commands, "stop", cmd_stop, "stop claims and free their GPUs, ports and CPUs; keep their containers and volumes",
                        connection)
    stop.add_argument("containers", nargs="+", metavar="container", help="container id or a unique prefix")
    start = _api_command(commands, "start", cmd_start, "start stopped claims again with the GPUs and ports they were made with", connection)
    start.add_argument("containers", nargs="+", metavar="container", help="container id or a unique prefix")
    _api_command(commands, "volumes", cmd_volumes, "list the claim volumes: size, use, backend and the claims mounting each", connection)
    volume = commands.add_parser("volume", help="make or remove claim volumes", description="Make or remove claim volumes.")
    volume_commands = volume.add_subparsers(dest="volume_command", required=True, metavar="COMMAND")
    volume_create = _api_command(volume_commands, "create", cmd_volume_create, "make a claim volume of a hard size", connection)
    volume_create.add_argument("name", help="the volume's name (as a claim id)")
    volume_create.add_argument("--size-gb", type=int, required=True, help="its size in GiB")
    volume_rm = _api_command(volume_commands, "rm", cmd_volume_rm, "remove claim volumes and their data (none a claim mounts)", connection)
    volume_rm.add_argument("names", nargs="+", metavar="name", help="the volume's name")
    _api_command(commands, "images", cmd_images, "list the node's images and the pulls in flight", connection)
    pull = _api_command(commands, "pull", cmd_pull, "pull an image ahead of the claims that will need it", connection)
    pull.add_argument("image", help="image reference")
    pull.add_argument("--username", help="the registry user (the password is asked for, or read from stdin)")
    pull.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    rmi = _api_command(commands, "rmi", cmd_rmi, "remove images no container uses", connection)
    rmi.add_argument("images", nargs="+", metavar="image", help="image reference or id")
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
    events.add_argument("--timeout", type=_positive_seconds, metavar="S", help="with -f, stop after S seconds")
    serve = commands.add_parser(
        "serve", help="start the agent: exec gunicorn with the shipped gunicorn.conf.py",
        description="Exec `gunicorn -c <root>/gunicorn.conf.py wsgi:app` from the agent's checkout.",
    )
    serve.add_argument("--root", help="the checkout holding gunicorn.conf.py and wsgi.py")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_logs()
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

