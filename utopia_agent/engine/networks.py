"""The claims' network as the engine knows it: made once, found again, removed only when empty.

One bridge network per agent for all its claims (the engine's default address pools allow about
30 bridge networks, so not one per claim), with inter-container traffic off and a bridge name
the agent chose, so its firewall rules can match the bridge before the network even exists.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from docker.types import IPAMConfig, IPAMPool

from ..config import Config
from ..claims.records import CLAIM_LABEL, MANAGED_FILTER
from ..errors import EngineError
from .connection import EngineConnection
from .errors import EngineNotFound

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
NETWORK_LABEL = "utopia.network"
STATE_DIR_LABEL = "utopia.network.state_dir"
DEFAULT_BRIDGE = "bridge"


@dataclass(frozen=True)
class ClaimNetwork:
    name: str
    bridge: str
    subnet: str | None
    gateway: str | None = None


@cache
def agent_suffix(state_dir: Path) -> str:
    """A short name for this agent among others on the same engine: its state dir is its own."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def claim_network_for(config: Config) -> ClaimNetwork:
    """The network this agent's claims join (an interface name has at most 15 characters)."""
    suffix = agent_suffix(config.state_dir)
    return ClaimNetwork(f"utopia-claims-{suffix}", f"utc-{suffix}", config.network_subnet)


def ensure_claim_network(engine: EngineConnection, wanted: ClaimNetwork, state_dir: str) -> ClaimNetwork:
    """The agent's network, made where missing; one of that name made otherwise (ICC on, another
    bridge) is refused rather than used, since claims on it would not be isolated."""
    try:
        with engine.call("inspect network") as api:
            found = api.inspect_network(wanted.name)
    except EngineNotFound:
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=wanted.subnet)]) if wanted.subnet else None
        with engine.call("create network") as api:
            api.create_network(
                wanted.name, driver="bridge", ipam=ipam, check_duplicate=True,
                options={ICC_OPTION: "false", BRIDGE_NAME_OPTION: wanted.bridge},
                labels={NETWORK_LABEL: "claims", STATE_DIR_LABEL: state_dir},
            )
        with engine.call("inspect network") as api:
            found = api.inspect_network(wanted.name)
    options = found.get("Options") or {}
    if found.get("Driver") != "bridge" or options.get(ICC_OPTION) != "false" or options.get(BRIDGE_NAME_OPTION) != wanted.bridge:
        raise EngineError(
            f"the network {wanted.name} exists but is not the agent's (it needs the bridge driver, "
            f"{ICC_OPTION}=false and bridge {wanted.bridge}); remove it or set UTOPIA_AGENT_STATE_DIR apart"
        )
    pools = (found.get("IPAM") or {}).get("Config") or [{}]
    return ClaimNetwork(wanted.name, wanted.bridge, pools[0].get("Subnet"), pools[0].get("Gateway"))


def remove_claim_network_if_empty(engine: EngineConnection, name: str) -> bool:
    """Remove the network when no container is on it; False (and nothing done) while one is."""
    try:
        with engine.call("inspect network") as api:
            found = api.inspect_network(name)
    except EngineNotFound:
        return True
    if found.get("Containers"):
        return False
    try:
        with engine.call("remove network") as api:
            api.remove_network(name)
    except EngineNotFound:
        pass
    return True


def claims_on_default_bridge(engine: EngineConnection) -> list[str]:
    """Claim ids of the managed containers on the engine's default bridge: made before isolation
    was turned on, and not isolated from each other or the node."""
    with engine.call("list containers") as api:
        rows = api.containers(all=True, filters={"label": [MANAGED_FILTER], "network": [DEFAULT_BRIDGE]})
    return sorted({(row.get("Labels") or {}).get(CLAIM_LABEL, row["Id"][:12]) for row in rows})
