"""The DNS resolvers the engine gives claims, read as the engine reads them.

A claim on a user-defined network asks the engine's resolver inside its own namespace
(127.0.0.11), which forwards each query to the node's resolvers from the claim's namespace: so
the agent's rules see them as the claim's own traffic, and must let port 53 through to exactly
these addresses, wherever they sit (GCE's resolver is its metadata server, 169.254.169.254;
many nodes run a cache on one of their own addresses).

The engine (libnetwork's resolvconf) reads /etc/resolv.conf, or systemd-resolved's upstream
file when the node's only nameserver is resolved's stub; drops loopback nameservers, which a
container cannot reach; and falls back to Google's public resolvers when none is left.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEMD_RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
SYSTEMD_RESOLVED_STUB = "127.0.0.53"
ENGINE_FALLBACK = ("8.8.8.8", "8.8.4.4")


def nameservers(text: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf, in order, comments and junk left out."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
            except ValueError:
                continue
    return found


def engine_resolvers(resolv_conf: Path = RESOLV_CONF, upstream: Path = SYSTEMD_RESOLVED_UPSTREAM) -> tuple[str, ...]:
    """The IPv4 resolvers a claim's queries go to (the claims' network is IPv4 only)."""
    try:
        servers = nameservers(resolv_conf.read_text())
        if servers == [SYSTEMD_RESOLVED_STUB]:
            servers = nameservers(upstream.read_text())
    except OSError:
        servers = []
    reachable = [s for s in servers if not ipaddress.ip_address(s).is_loopback]
    if not reachable:
        reachable = list(ENGINE_FALLBACK)
    return tuple(dict.fromkeys(s for s in reachable if ipaddress.ip_address(s).version == 4))
