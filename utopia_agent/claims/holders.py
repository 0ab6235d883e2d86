"""Who holds which GPU, host port, volume and CPU: one function per question, from `Holdings`.

The Holdings come from the engine's list of managed containers when allocation decides under
the lock (`carrying`), from its label-filtered lists elsewhere (`DockerManager.holders_of`), or
from the listing of managed containers (`ManagedContainer.holdings`) when the API, the metrics
and the CLI show the node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .records import Holdings

class GpuIdentity(Protocol):
    """What a GPU is known by in the claims' labels: the inventory's GpuStatus has both."""

    @property
    def uuid(self) -> str | None: ...

    @property
    def index(self) -> int: ...


def carrying(rows: Iterable[Mapping[str, Any]], label: str, parsed: dict[str, Holdings] | None = None) -> list[Holdings]:
    """What the engine's list rows that carry `label` hold; `label` is `key` or `key=value`, matched
    as the engine's label filter matches it. `parsed` keeps each row's Holdings by container id for
    further questions on the same rows, so a row is parsed once however many labels are asked
    (a create asks up to seven: at 100 claims, four parses of every row were 3 ms of it)."""
    parsed = {} if parsed is None else parsed
    held = []
    for row in rows:
        if has_label(row.get("Labels") or {}, label):
            if (holdings := parsed.get(row["Id"])) is None:
                holdings = parsed[row["Id"]] = Holdings.of_row(row)
            held.append(holdings)
    return held


def has_label(labels: Mapping[str, str], label: str) -> bool:
    """Whether `labels` match `label`, `key` or `key=value`, as the engine's label filter matches."""
    key, has_value, value = label.partition("=")
    return key in labels and (not has_value or labels[key] == value)


def gpu_keys(held: Holdings) -> tuple[str, ...]:
    """How the GPUs a container holds are told apart: by UUID, which survives NVML renumbering
    after a reboot; by '#<index>' only for labels without UUIDs."""
    if held.gpu_uuids and len(held.gpu_uuids) == len(held.gpu_ids):
        return tuple(held.gpu_uuids)
    return tuple(f"#{index}" for index in held.gpu_ids)


def gpu_claims(holdings: Iterable[Holdings]) -> dict[str, str]:
    """GPU key (see gpu_keys) -> the claim holding it: what GPU states are derived from."""
    return {key: held.claim_id for held in holdings for key in gpu_keys(held)}


def gpu_holder(gpu: GpuIdentity, claims: Mapping[str, str]) -> str | None:
    """The claim holding a GPU of the inventory among `claims` (from gpu_claims), or None."""
    return claims.get(gpu.uuid) if gpu.uuid in claims else claims.get(f"#{gpu.index}")


def claims_on(gpu: GpuIdentity, holdings: Iterable[Holdings]) -> list[str]:
    """Every claim holding a GPU of the inventory, by its UUID then by its index: a double allocation shows both."""
    holdings = list(holdings)
    return [held.claim_id for key in (gpu.uuid, f"#{gpu.index}") for held in holdings if key in gpu_keys(held)]


def gpus_held_twice(holdings: Iterable[Holdings]) -> dict[str, tuple[str, ...]]:
    """GPU key -> the containers holding it, for GPUs that more than one container claims: reported, never silently merged."""
    containers: dict[str, list[str]] = {}
    for held in holdings:
        for key in gpu_keys(held):
            containers.setdefault(key, []).append(held.container_id)
    return {key: tuple(ids) for key, ids in containers.items() if len(ids) > 1}


def port_holders(holdings: Iterable[Holdings]) -> dict[tuple[int, str], str]:
    """(host port, protocol) -> the container publishing it."""
    return {(mapping.host_port, mapping.protocol): held.container_id for held in holdings for mapping in held.port_mappings}


def volume_holders(holdings: Iterable[Holdings]) -> dict[str, str]:
    """Host path -> the container mounting it."""
    return {host: held.container_id for held in holdings for host in held.volume_hosts}


def exclusive_cpus(holdings: Iterable[Holdings]) -> set[int]:
    """The CPUs that claims pinned exclusively (UTOPIA_AGENT_CPU_PINNING=exclusive) hold."""
    return {cpu for held in holdings for cpu in held.exclusive_cpus}


def claim_volume_users(holdings: Iterable[Holdings]) -> dict[str, list[tuple[str, bool]]]:
    """Claim volume -> (claim, read_only) of every container mounting it, running or stopped."""
    users: dict[str, list[tuple[str, bool]]] = {}
    for held in holdings:
        for name, read_only in held.claim_volumes:
            users.setdefault(name, []).append((held.claim_id, read_only))
    return users
