"""Tenant networks: claims on the agent's own bridge, fenced off by the agent's own firewall rules.

The master puts the rules in place before any worker starts (and refuses to start when it cannot);
the network itself is made then too, or as soon as the engine answers. One worker of the node
then checks the rules every few seconds and restores what an engine restart or a firewall reload
took away. What it finds goes to a record in the state dir, which every worker reads: /health
and creates answer 503 while claims would run unprotected, never silently.

Everything is named after the agent's state dir, so agents that share an engine (the tests, a
developer's helpers) never touch each other's network or chains.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..engine.connection import EngineConnection
from ..engine.networks import (
    ClaimNetwork,
    agent_suffix,
    claim_network_for,
    claims_on_default_bridge,
    ensure_claim_network,
    remove_claim_network_if_empty,
)
from ..errors import AgentError
from ..node.role import NodeRole
from ..node.state_file import StateFile
from .firewall import LINK_LOCAL, Firewall, FirewallError, IsolationRules
from .resolvers import engine_resolvers

log = logging.getLogger("utopia_agent.network")

# An engine restart or a firewall reload is repaired within this long; while something is wrong
# (the engine down when the network was to be made, say), the check comes every second.
CHECK_INTERVAL_SECONDS = 5.0
RETRY_INTERVAL_SECONDS = 1.0
STATUS_FILE = "network.json"
ROLE_FILE = "network.lock"


class IsolationFailed(Exception):
    """The rules cannot be put in place; the agent must not run claims."""


@dataclass(frozen=True)
class IsolationPlan:
    """This agent's network and rules, named after its state dir."""

    network: ClaimNetwork
    rules: IsolationRules

    @classmethod
    def for_config(cls, config: Config) -> IsolationPlan:
        network = claim_network_for(config)
        suffix = agent_suffix(config.state_dir)
        rules = IsolationRules(network.bridge, f"UTOPIA-IN-{suffix}", f"UTOPIA-FWD-{suffix}", config.blocked_networks, engine_resolvers())
        return cls(network, rules)

    def with_current_resolvers(self) -> IsolationPlan:
        """The same plan with the node's resolvers as they are now (a DHCP renewal rewrites them)."""
        return replace(self, rules=replace(self.rules, resolvers=engine_resolvers()))

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> IsolationPlan:
        """The names an agent on `state_dir` uses, for tidying up after one that is gone."""
        return cls.for_config(Config(token="-", state_dir=state_dir))


class NetworkIsolation:
    """The agent's side of tenant isolation: set up, kept, reported."""

    def __init__(self, config: Config, engine: EngineConnection, firewall: Firewall | None = None,
                 interval: float = CHECK_INTERVAL_SECONDS):
        self.config = config
        self.plan = IsolationPlan.for_config(config)
        self._engine = engine
        self._firewall = firewall or Firewall()
        self._record = StateFile(config.state_dir / STATUS_FILE)
        self._role = NodeRole(config.state_dir / ROLE_FILE)
        self._interval = interval
        self._cached: tuple[tuple[int, int], dict[str, Any]] = ((0, 0), {})
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="network-isolation", daemon=True)

    # --- the master, at start and at a clean stop --------------------------------------

    def establish(self) -> None:
        """Rules first (they match the bridge by name, so they hold before the network exists),
        then the network, then a look for claims made before isolation; raise IsolationFailed
        when the rules cannot be put in place."""
        if not self.config.network_isolation:
            self._tear_down_rules()
            self._write({"isolation": "off"})
            return
        self.plan = self.plan.with_current_resolvers()
        try:
            self._firewall.apply(self.plan.rules)
            left = self._firewall.problems(self.plan.rules)
        except FirewallError as error:
            raise IsolationFailed(str(error)) from None
        if left:
            raise IsolationFailed("the rules did not stay in place: " + "; ".join(left))
        network, problem = self._ensure_network()
        unprotected = self._unprotected_claims()
        if unprotected:
            log.warning("claims on the engine's default bridge are not isolated (made before isolation was on; "
                        "recreate them to move them): %s", ", ".join(unprotected))
        self._write(self._status(network, rules_problem=None, network_problem=problem, unprotected=unprotected))
        log.info("claims isolated on network %s (bridge %s, subnet %s, DNS to %s)", network.name, network.bridge,
                 network.subnet or "not yet made", ", ".join(self.plan.rules.resolvers) or "no resolver")

    def leave(self) -> None:
        """At a clean stop: remove the network and the rules only when no container is on the
        network; with claims running their protection stays in place while the agent is down."""
        if not self.config.network_isolation:
            return
        try:
            empty = remove_claim_network_if_empty(self._engine, self.plan.network.name)
        except AgentError as error:
            log.info("claims network kept: %s", error.message)
            return
        if empty:
            self._tear_down_rules()
            self._record.remove()

    def _tear_down_rules(self) -> None:
        try:
            self._firewall.remove(self.plan.rules)
        except FirewallError as error:
            log.warning("the agent's firewall rules could not be removed: %s", error)

    # --- one worker of the node, every few seconds -------------------------------------

    def start(self) -> NetworkIsolation:
        if self.config.network_isolation:
            self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._engine.close()

    def _run(self) -> None:
        """The worker holding the role checks; the others sleep in flock until it dies or stops."""
        wait = self._interval
        while self._role.take(block=True) and not self._closed.wait(wait):
            wait = self._interval
            try:
                if self.check().get("problem"):
                    wait = min(self._interval, RETRY_INTERVAL_SECONDS)
            except OSError as error:  # the state dir: the next round tries again
                log.warning("network isolation not checked: %s", error)
        self._role.release()

    def check(self) -> dict[str, Any]:
        """Find what is out of place (the node's resolvers changed, say), restore it, and record what holds now."""
        before = self._record.read()
        self.plan = self.plan.with_current_resolvers()
        resolvers = list(self.plan.rules.resolvers)
        resolvers_changed = "resolvers" in before and before["resolvers"] != resolvers
        rules_problem = None
        try:
            missing = self._firewall.problems(self.plan.rules)
            if missing:
                self._firewall.apply(self.plan.rules)
                still = self._firewall.problems(self.plan.rules)
                if still:
                    rules_problem = "; ".join(still)
                elif resolvers_changed:
                    log.warning("the node's DNS resolvers changed: claims may now ask %s", ", ".join(resolvers) or "none")
                else:
                    log.warning("firewall rules restored (%s)", "; ".join(missing))
        except FirewallError as error:
            rules_problem = str(error)
        if rules_problem and rules_problem != before.get("problem"):
            log.error("claims are not protected: their firewall rules cannot be restored: %s", rules_problem)
        network, network_problem = self._ensure_network()
        unprotected = self._unprotected_claims() if before.get("unprotected_claims") else []
        status = self._status(network, rules_problem, network_problem, unprotected)
        if status != before:
            self._write(status)
        return status

    # --- every worker -----------------------------------------------------------------

    @staticmethod
    def recorded(config: Config) -> dict[str, Any]:
        """The last record the agent on `config`'s state dir wrote (for the CLI)."""
        return StateFile(config.state_dir / STATUS_FILE).read()

    def status(self) -> dict[str, Any]:
        """The last record, re-read only when its file changed (one stat)."""
        try:
            stat = os.stat(self._record.path)
        except FileNotFoundError:
            if not self.config.network_isolation:
                return {"isolation": "off"}
            return {"isolation": "on", "rules_in_place": False, "problem": "the agent has not set up its network isolation"}
        key = (stat.st_mtime_ns, stat.st_ino)
        if key != self._cached[0]:
            self._cached = (key, self._record.read())
        return self._cached[1]

    def problem(self) -> str | None:
        """Why a claim could not run protected now (rules missing, network not made); None when it
        could, or when isolation is off."""
        status = self.status()
        if status.get("isolation") == "off":
            return None
        return status.get("problem") or (None if status.get("rules_in_place") else "network isolation is not in place")

    # --- helpers ----------------------------------------------------------------------

    def _ensure_network(self) -> tuple[ClaimNetwork, str | None]:
        try:
            return ensure_claim_network(self._engine, self.plan.network, str(self.config.state_dir)), None
        except AgentError as error:
            return self.plan.network, f"the claims network is not made yet: {error.message}"

    def _unprotected_claims(self) -> list[str]:
        try:
            return claims_on_default_bridge(self._engine)
        except AgentError:
            return []

    def _status(self, network: ClaimNetwork, rules_problem: str | None, network_problem: str | None,
                unprotected: list[str]) -> dict[str, Any]:
        return {
            "isolation": "on",
            **asdict(network),
            "blocked_networks": [LINK_LOCAL, *self.plan.rules.blocked],
            "resolvers": list(self.plan.rules.resolvers),
            "rules_in_place": rules_problem is None,
            "problem": rules_problem or network_problem,
            "unprotected_claims": unprotected,
        }

    def _write(self, status: dict[str, Any]) -> None:
        self._record.write(status)
        self._cached = ((0, 0), {})
