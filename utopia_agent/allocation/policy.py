"""Node policy: what a caller holding the token may ask of this node, and no more.

Each rule raises PolicyViolation naming the field, before anything reaches the engine.
"""

from __future__ import annotations

import hashlib
import json

import os
from dataclasses import replace
from typing import Any

from ..config import Config
from ..claims.records import LABEL_PREFIX, ClaimMount, ContainerSpec, PortMapping
from ..errors import PolicyViolation
from ..claims.resources import infiniband_devices, memlock_limit
from ..claims.volumes import Volume, VolumeRefused, overlap, parse_volume, within

SHADOWED_CONTAINER_PATHS = ("/proc", "/sys", "/dev")
# Names that select or widen GPUs: the agent alone decides them. Every NVIDIA_* name belongs to
# the NVIDIA runtime; CUDA_VERSION makes it give every GPU to an image without NVIDIA_VISIBLE_DEVICES.
RESERVED_ENV_PREFIXES = ("NVIDIA_",)
RESERVED_ENV_NAMES = frozenset({
    "CUDA_VERSION",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "GPU_DEVICE_ORDINAL",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
})


def _field_error(field: str, message: str) -> PolicyViolation:
    return PolicyViolation(f"{field}: {message}", errors={field: [message]})


def check_env_vars(env_vars: list[str], field: str = "env_vars") -> None:
    """No GPU-selecting name, at create (`env_vars`) or in an exec's own `env`."""
    for entry in env_vars:
        name = entry.split("=", 1)[0]
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise _field_error(field, f"{name} is reserved: GPUs are chosen by the agent through gpu_count")


def check_image_labels(image: str, labels: dict[str, str]) -> None:
    """Refuse an image that carries the agent's own labels: the engine copies them onto the
    container, where they would hold GPUs and ports the agent never gave, or fake a claim."""
    forged = sorted(key for key in labels if key.startswith(LABEL_PREFIX))
    if forged:
        raise _field_error("image", f"{image} carries labels reserved for the agent ({', '.join(forged)})")


def check_ports(port_mappings: list[dict[str, Any]], config: Config) -> None:
    low, high = config.host_port_range
    for mapping in port_mappings:
        if not low <= mapping["host_port"] <= high:
            raise _field_error("port_mappings", f"host port {mapping['host_port']} is outside the node's range {low}-{high}")


def check_volumes(volumes: dict[str, str], config: Config) -> tuple[Volume, ...]:
    """Each host path inside a volume root (not the root itself), existing, with no symlink below
    the root, and apart from every other volume of the request; each container path clear of
    the system paths. Other claims' volumes are checked under the allocation lock."""
    roots: dict[str, str] = {}
    for root in config.effective_volume_roots:
        real = os.path.realpath(root)
        roots[os.path.normpath(str(root))] = real
        roots[real] = real
    checked: list[Volume] = []
    targets: set[str] = set()
    for host, inside in volumes.items():
        try:
            volume = parse_volume(host, inside, roots)
        except VolumeRefused as refused:
            raise _field_error("volumes", str(refused)) from None
        except OSError as exc:
            raise _field_error("volumes", f"{host} cannot be checked ({exc.strerror})") from None
        for other in checked:
            if overlap(volume.host, other.host):
                same = "is given twice" if volume.host == other.host else f"overlaps {other.host} of the same request"
                raise _field_error("volumes", f"host path {host} {same}")
        # normpath keeps a leading `//`, which the engine reads as `/`: "//proc" is /proc.
        target = os.path.normpath("/" + volume.target.lstrip("/"))
        if target == "/" or any(within(target, p) for p in SHADOWED_CONTAINER_PATHS):
            raise _field_error("volumes", f"container path {inside} would shadow a system path")
        if target in targets:
            raise _field_error("volumes", f"container path {inside} is mounted twice")
        targets.add(target)
        checked.append(replace(volume, target=target))
    return tuple(checked)


def check_mounts(mounts: list[dict[str, Any]], taken: set[str]) -> tuple[ClaimMount, ...]:
    """Each claim volume once, each at its own container path clear of the system paths and of the host volumes' (`taken`)."""
    checked: list[ClaimMount] = []
    for mount in mounts:
        target = os.path.normpath("/" + mount["path"].lstrip("/"))
        if target == "/" or any(within(target, p) for p in SHADOWED_CONTAINER_PATHS):
            raise _field_error("mounts", f"container path {mount['path']} would shadow a system path")
        if target in taken:
            raise _field_error("mounts", f"container path {mount['path']} is mounted twice")
        if any(other.volume == mount["volume"] for other in checked):
            raise _field_error("mounts", f"volume {mount['volume']} is given twice")
        taken.add(target)
        checked.append(ClaimMount(mount["volume"], target, mount["read_only"]))
    return tuple(checked)


def check_volumes_apart(volumes: tuple[Volume, ...], mounted: dict[str, str], engine_root: str | None) -> None:
    """No volume may lie inside or contain one that a managed container mounts (`mounted`: host
    path -> container id), nor the engine's data root: a tenant would reach the other's files."""
    for volume in volumes:
        for host, holder in mounted.items():
            if overlap(volume.host, host):
                raise _field_error("volumes", f"{volume.host} overlaps {host}, mounted by container {holder[:12]}")
        if engine_root and overlap(volume.host, engine_root):
            raise _field_error("volumes", f"{volume.host} overlaps the engine's data root {engine_root}")


def build_container_spec(request: dict[str, Any], config: Config) -> ContainerSpec:
    """Apply the node policy to a validated create request and return what to create."""
    check_env_vars(request["env_vars"])
    check_ports(request["port_mappings"], config)
    volumes = check_volumes(request["volumes"], config)
    mounts = check_mounts(request.get("mounts", []), {volume.target for volume in volumes})
    return ContainerSpec(
        claim_id=request["claim_id"],
        image=request["image"],
        port_mappings=tuple(PortMapping(m["host_port"], m["container_port"], m["protocol"]) for m in request["port_mappings"]),
        env_vars=tuple(request["env_vars"]),
        command=tuple(request["command"]),
        working_dir=request["working_dir"],
        volumes=volumes,
        mounts=mounts,
        cpus=request.get("cpus"),
        memory_mb=request.get("memory_mb"),
        shm_size_mb=request.get("shm_size_mb"),
        disk_gb=request.get("disk_gb"),
        restart_policy=request.get("restart_policy") or config.restart_policy,
        spec_digest=spec_digest(request),
        **_infiniband(config),
    )


def spec_digest(request: dict[str, Any]) -> str:
    """The digest of a validated create request, all of it but the registry's credentials: two
    creates get the same one exactly when they asked for the same container."""
    asked = {key: value for key, value in request.items() if key != "registry_auth"}
    return hashlib.sha256(json.dumps(asked, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _infiniband(config: Config) -> dict[str, Any]:
    """The node's InfiniBand devices and the memlock that RDMA needs, when the node has any."""
    devices = tuple(str(config.infiniband_dir / name) for name in infiniband_devices(config.infiniband_dir))
    return {"infiniband_devices": devices, "memlock_bytes": memlock_limit()} if devices else {}
