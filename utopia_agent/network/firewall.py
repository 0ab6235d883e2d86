"""The agent's iptables rules that keep claims from the node, the metadata service and each other.

Two chains of the agent's own, each entered by one jump that matches the claims' bridge:
- INPUT -> the input chain: traffic from a claim to any address of the node itself (the agent's
  port, sshd, exporters, the bridge gateway) is dropped, but for replies to connections the node
  opened (the engine's port proxy to a published port, say). Neither the engine's ICC setting
  nor DOCKER-USER sees this traffic: it is for the host, not forwarded.
- DOCKER-USER (FORWARD where the engine keeps no DOCKER-USER) -> the forward chain: traffic from
  a claim to another claim on the same bridge, to 169.254.0.0/16 and to the blocked networks is
  dropped, the destination matched both as sent and as conntrack first saw it (before a DNAT).
Before the drops of both, DNS (port 53, UDP and TCP) to the node's resolvers returns to the parent
chain: the engine's resolver in each claim forwards its queries from the claim's own namespace, and
a node's resolver may sit on a node address or at the metadata service (GCE). Nothing else at those
addresses is let through.
The jumps must come before any other rule of their chain (other agents' jumps aside, which match
only their own bridges), so no ACCEPT of the operator's or the engine's can come first.

Reading is one `iptables -S`; a repair is one `iptables-restore --noflush` transaction, so the
chains are never seen half-filled. Only what these rules name is touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

LINK_LOCAL = "169.254.0.0/16"
DOCKER_USER = "DOCKER-USER"
# Other agents' (and our own) jumps may come first: each matches only its own bridge.
_AGENT_JUMP = re.compile(r"^-A (INPUT|FORWARD|DOCKER-USER) -i \S+ -j UTOPIA-(IN|FWD)-\w+$")
TIMEOUT_SECONDS = 30.0


class FirewallError(Exception):
    """iptables is missing, not permitted, or refused a rule; the message says which."""


@dataclass(frozen=True)
class IsolationRules:
    """The rules for one agent's claims bridge; chain names carry the agent's own suffix."""

    bridge: str
    input_chain: str
    forward_chain: str
    blocked: tuple[str, ...]
    resolvers: tuple[str, ...] = ()

    def chain_rules(self) -> dict[str, list[list[str]]]:
        established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]
        dns = [["-d", f"{resolver}/32", "-p", protocol, "-m", protocol, "--dport", "53", "-j", "RETURN"]
               for resolver in self.resolvers for protocol in ("udp", "tcp")]
        forward = [established, *dns, ["-o", self.bridge, "-j", "DROP"]]
        for network in (LINK_LOCAL, *self.blocked):
            forward.append(["-d", network, "-j", "DROP"])
            # iptables prints a single address back without its /32 here (and with it for -d).
            forward.append(["-m", "conntrack", "--ctorigdst", network.removesuffix("/32"), "-j", "DROP"])
        return {self.input_chain: [established, *dns, ["-j", "DROP"]], self.forward_chain: forward}

    def jumps(self, forward_parent: str) -> dict[str, str]:
        """Parent chain -> the chain its jump enters."""
        return {"INPUT": self.input_chain, forward_parent: self.forward_chain}

    def jump_line(self, parent: str, chain: str) -> str:
        return f"-A {parent} -i {self.bridge} -j {chain}"


@dataclass(frozen=True)
class FirewallState:
    """What `iptables -S` shows of the filter table, as its lines."""

    lines: tuple[str, ...]

    def chain(self, name: str) -> list[str]:
        prefix = f"-A {name} "
        return [line for line in self.lines if line.startswith(prefix)]

    def has_chain(self, name: str) -> bool:
        return f"-N {name}" in self.lines or f"-P {name} ACCEPT" in self.lines or f"-P {name} DROP" in self.lines


class Firewall:
    """iptables, the tool the engine itself uses on this node (legacy or nft alike)."""

    def __init__(self, iptables: str = "iptables", restore: str = "iptables-restore"):
        self.iptables = iptables
        self.restore = restore

    def read(self) -> FirewallState:
        return FirewallState(tuple(self._run(["-w", "-S"]).splitlines()))

    def problems(self, rules: IsolationRules, state: FirewallState | None = None) -> list[str]:
        """What is missing or out of place; empty when the rules stand as they should."""
        state = state or self.read()
        found: list[str] = []
        for chain, expected in rules.chain_rules().items():
            if not state.has_chain(chain):
                found.append(f"chain {chain} is missing")
            elif state.chain(chain) != [_normal(chain, rule) for rule in expected]:
                found.append(f"chain {chain} does not hold the agent's rules")
        forward_parent = self.forward_parent(state)
        for parent, chain in rules.jumps(forward_parent).items():
            if not _first_after_agent_jumps(state.chain(parent), rules.jump_line(parent, chain)):
                found.append(f"{parent} does not jump to {chain} before its other rules")
        if forward_parent == DOCKER_USER and not _first_after_agent_jumps(state.chain("FORWARD"), f"-A FORWARD -j {DOCKER_USER}"):
            found.append(f"FORWARD does not jump to {DOCKER_USER} first")
        return found

    def apply(self, rules: IsolationRules) -> None:
        """Put the rules in place in one transaction: chains filled afresh, jumps moved first."""
        state = self.read()
        forward_parent = self.forward_parent(state)
        lines = ["*filter"]
        for chain in rules.chain_rules():
            lines.append(f":{chain} - [0:0]")  # declared (made or flushed) by the transaction
        for chain, expected in rules.chain_rules().items():
            lines.extend(f"-A {chain} {' '.join(rule)}" for rule in expected)
        jumps = rules.jumps(forward_parent)
        if forward_parent == DOCKER_USER:
            jumps = {**jumps, "FORWARD": DOCKER_USER}
        for parent, chain in jumps.items():
            line = f"-A {parent} -j {chain}" if chain == DOCKER_USER else rules.jump_line(parent, chain)
            if _first_after_agent_jumps(state.chain(parent), line):
                continue
            lines.extend("-D" + existing[2:] for existing in state.chain(parent) if existing == line)
            lines.append(f"-I {parent} 1" + line[len(f"-A {parent}"):])
        lines.append("COMMIT")
        self._run(["-w", "--noflush"], tool=self.restore, stdin="\n".join(lines) + "\n")

    def remove(self, rules: IsolationRules) -> None:
        """Take out the jumps to the agent's chains and the chains themselves; nothing else."""
        state = self.read()
        lines = ["*filter"]
        for parent in ("INPUT", "FORWARD", DOCKER_USER):
            for chain in rules.chain_rules():
                line = rules.jump_line(parent, chain)
                lines.extend("-D" + existing[2:] for existing in state.chain(parent) if existing == line)
        for chain in rules.chain_rules():
            if state.has_chain(chain):
                lines.extend([f"-F {chain}", f"-X {chain}"])
        if len(lines) > 1:
            self._run(["-w", "--noflush"], tool=self.restore, stdin="\n".join(lines + ["COMMIT"]) + "\n")

    def forward_parent(self, state: FirewallState) -> str:
        """DOCKER-USER where the engine keeps it (it manages iptables), else FORWARD itself."""
        return DOCKER_USER if state.has_chain(DOCKER_USER) else "FORWARD"

    def _run(self, args: Sequence[str], tool: str | None = None, stdin: str | None = None) -> str:
        tool = tool or self.iptables
        if shutil.which(tool) is None:
            raise FirewallError(f"{tool} is not installed (the Debian package iptables)")
        try:
            done = subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{tool} did not answer within {TIMEOUT_SECONDS:g} s") from None
        except OSError as exc:
            raise FirewallError(f"{tool} cannot run: {exc.strerror}") from None
        if done.returncode != 0:
            said = " ".join((done.stderr or done.stdout).split())[:300] or f"exit status {done.returncode}"
            raise FirewallError(f"{tool} failed: {said}")
        return done.stdout


def _normal(chain: str, rule: list[str]) -> str:
    """A rule as `iptables -S` prints it back."""
    return f"-A {chain} {' '.join(rule)}"


def _first_after_agent_jumps(lines: list[str], wanted: str) -> bool:
    """`wanted` is in `lines`, and only agents' jumps come before it."""
    for line in lines:
        if line == wanted:
            return True
        if not _AGENT_JUMP.match(line):
            return False
    return False
