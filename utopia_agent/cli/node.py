"""The commands that run on the node itself, beside the agent: `check` (what the agent will find
at start) and `gpus --local` (NVML and the managed containers' labels, without the agent)."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import CERT_VARIABLE, Config, ConfigError, certificate_facts, utc_text
from ..claims.disks import gb_of
from ..disks.node_disk import NodeDisk
from ..disks.quota import EngineCannotEnforce
from ..engine.manager import DockerManager
from ..errors import EngineUnavailable, NodeFault
from ..gpus.inventory import GpuBackendError, GpuInventory, GpuStatus, make_inventory
from ..claims.holders import claims_on
from ..claims.records import Holdings
from ..network.firewall import Firewall, FirewallError
from ..network.isolation import IsolationPlan, NetworkIsolation
from ..node.state_dir import RunningAgent
from .common import CERTIFICATE_WARNING_DAYS, EXIT_CONFIG, EXIT_FAILED, PROG, CheckFailed, agent_config, print_json, print_table

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


def cmd_check(args: argparse.Namespace) -> int:
    """Everything the agent needs at start, in the order it needs it; stop at the first failure."""
    config, agent = agent_config()
    print(f"config: ok (bind {config.bind}, {config.workers} workers, state dir {config.state_dir}, "
          f"GPU backend {config.gpu_backend})")
    print(_describe_agent(agent))
    if config.tls is not None:
        _check_certificate(config)

    docker = DockerManager(config)
    try:
        docker.ping()
        version = docker.engine_version()
        print(f"engine: ok, Docker {version} at {_engine_location()}")
        print(_check_disk(config, docker))
    except EngineUnavailable as error:
        raise CheckFailed(f"{error.message} at {_engine_location()}") from None
    finally:
        docker.close()
    print(_check_isolation(config, running=agent is not None))

    inventory = _inventory(config)
    try:
        gpus = inventory.snapshot()
    finally:
        inventory.close()
    failed = sum(not gpu.healthy for gpu in gpus)
    print(f"gpus: {len(gpus)} found (backend {inventory.backend})" + (f", {failed} failed and never allocated" if failed else ""))
    if gpus:
        print_table([row[:-1] for row in _gpu_rows(gpus, [])], indent="  ")
    return 0


def _check_disk(config: Config, docker: DockerManager) -> str:
    """The quota mode in force and the claims' allocatable disk; a failure where UTOPIA_AGENT_DISK_QUOTA=engine
    and the engine cannot enforce sizes, or where the agent does not see the engine's data root."""
    disk = NodeDisk(config, docker)
    try:
        mode = disk.quota()
        size, _ = disk.filesystem_bytes()
    except EngineCannotEnforce as error:
        raise CheckFailed(f"disk: UTOPIA_AGENT_DISK_QUOTA=engine, but the engine does not enforce container disk sizes: {error}") from None
    except NodeFault as error:
        raise CheckFailed(f"disk: {error.message}") from None
    return (f"disk: quota {mode.mode} ({mode.engine_reason}), {disk.allocatable_gb():g} GB allocatable to claims "
            f"of {gb_of(size):g} GB at {docker.storage().data_root}")


def _check_isolation(config: Config, running: bool) -> str:
    """The claims' network isolation as the firewall shows it now; a failure where the running
    agent's rules are missing, or where they could not be put in place at start."""
    if not config.network_isolation:
        return "network: isolation off (claims on the engine's default bridge)"
    plan = IsolationPlan.for_config(config)
    try:
        missing = Firewall().problems(plan.rules)
    except FirewallError as error:
        raise CheckFailed(f"network: claims cannot be isolated: {error}") from None
    where = f"network {plan.network.name} (bridge {plan.network.bridge}), blocking {', '.join(plan.rules.blocked) or 'no networks'} beyond 169.254.0.0/16"
    if missing and running:
        raise CheckFailed(f"network: the running agent's isolation rules are not in place: {'; '.join(missing)}")
    if missing:
        return f"network: isolation on, {where}; rules not in place yet (the agent puts them in place at start)"
    unprotected = NetworkIsolation.recorded(config).get("unprotected_claims") or []
    note = f"; not isolated (on the default bridge): {', '.join(unprotected)}" if unprotected else ""
    return f"network: ok, isolation on, {where}, rules in place{note}"


def _check_certificate(config: Config) -> None:
    """What the certificate the agent will serve says, and a warning while it has little time left."""
    try:
        config.tls.server_context()  # as the agent loads the pair at start
        facts = certificate_facts(config.tls.cert_file, CERT_VARIABLE)
    except ConfigError as error:
        raise CheckFailed(f"configuration error: {error}", EXIT_CONFIG) from None
    days = facts.days_left()
    client_ca = f", client certificates signed by {config.tls.client_ca_file}" if config.tls.client_ca_file else ""
    print(f"tls: ok, {facts.subject}, names {', '.join(facts.names) or 'none'}, expires {utc_text(facts.not_after)} "
          f"(in {days:.0f} days){client_ca}")
    if days < CERTIFICATE_WARNING_DAYS:
        print(f"{PROG}: warning: the certificate in {config.tls.cert_file} expires in {days:.1f} days; "
              "renew it and send the agent SIGHUP", file=sys.stderr)


def cmd_local_gpus(args: argparse.Namespace) -> int:
    """The GPU table with each GPU's claim, from NVML and the managed containers' labels.

    Reading GPUs and labels needs no token, so a missing one is filled in here and `gpus`
    works from an operator's shell that lacks the agent's token file.
    """
    env = dict(os.environ)
    env.pop("UTOPIA_AGENT_TOKEN_FILE", None)
    env["UTOPIA_AGENT_TOKEN"] = "unused-by-the-gpus-command"
    config, _ = agent_config(env)
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
        print_json([{
            "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "healthy": gpu.healthy,
            "memory_used_mb": gpu.memory_used_mb, "memory_total_mb": gpu.memory_total_mb,
            "temperature_c": gpu.temperature_c,
            "claims": None if holdings is None else claims_on(gpu, holdings),
        } for gpu in gpus])
    else:
        print(f"gpus: {len(gpus)} found (backend {inventory.backend})")
        if gpus:
            print_table(_gpu_rows(gpus, holdings))
    return 0 if holdings is not None else EXIT_FAILED
