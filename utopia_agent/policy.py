"""Node policy: what a caller holding the token may ask of this node, and no more.

Each rule raises PolicyViolation naming the field, before anything reaches the engine.
"""

from __future__ import annotations

import os
from typing import Any

from .config import Config
from .docker_manager import LABEL_PREFIX, ContainerSpec, PortMapping
from .errors import PolicyViolation

SYSTEM_PATHS = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run/docker.sock", "/var/run/docker.sock", "/var/lib/docker", "/run/containerd")
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


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _field_error(field: str, message: str) -> PolicyViolation:
    return PolicyViolation(f"{field}: {message}", errors={field: [message]})


def check_env_vars(env_vars: list[str]) -> None:
    for entry in env_vars:
        name = entry.split("=", 1)[0]
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise _field_error("env_vars", f"{name} is reserved: GPUs are chosen by the agent through gpu_count")


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


def check_volumes(volumes: dict[str, str], config: Config) -> dict[str, str]:
    """Resolve each host path (`..` and symlinks) and keep it inside the volume roots."""
    roots = [os.path.realpath(root) for root in config.effective_volume_roots]
    state_dir = os.path.realpath(config.state_dir)
    resolved: dict[str, str] = {}
    targets: set[str] = set()
    for host, inside in volumes.items():
        try:
            real = os.path.realpath(host)
        except OSError as exc:  # a link the agent may not read (/proc/1/root): nothing proves where it leads
            raise _field_error("volumes", f"{host} cannot be resolved ({exc.strerror})") from None
        if real == "/" or any(_within(real, p) or _within(p, real) for p in SYSTEM_PATHS):
            raise _field_error("volumes", f"{host} is a system path and cannot be mounted")
        if not any(_within(real, root) for root in roots):
            raise _field_error("volumes", f"{host} is outside the node's volume roots ({':'.join(roots)})")
        # Inside the state dir only a volume root of its own (the default STATE_DIR/volumes) may
        # be mounted; a root above it, say `/`, does not open the lock file to callers.
        inside_state_root = any(_within(real, r) and _within(r, state_dir) and r != state_dir for r in roots)
        if _within(state_dir, real) or (_within(real, state_dir) and not inside_state_root):
            raise _field_error("volumes", f"{host} is the agent's state and cannot be mounted")
        if real in resolved:
            raise _field_error("volumes", f"host path {host} is given twice")
        # normpath keeps a leading `//`, which the engine reads as `/`: "//proc" is /proc.
        target = os.path.normpath("/" + inside.lstrip("/"))
        if target == "/" or any(_within(target, p) for p in SHADOWED_CONTAINER_PATHS):
            raise _field_error("volumes", f"container path {inside} would shadow a system path")
        if target in targets:
            raise _field_error("volumes", f"container path {inside} is mounted twice")
        targets.add(target)
        resolved[real] = target
    return resolved


def build_spec(request: dict[str, Any], config: Config) -> ContainerSpec:
    """Apply the node policy to a validated create request and return what to create."""
    check_env_vars(request["env_vars"])
    check_ports(request["port_mappings"], config)
    volumes = check_volumes(request["volumes"], config)
    return ContainerSpec(
        claim_id=request["claim_id"],
        image=request["image"],
        port_mappings=tuple(PortMapping(m["host_port"], m["container_port"], m["protocol"]) for m in request["port_mappings"]),
        env_vars=tuple(request["env_vars"]),
        command=tuple(request["command"]),
        working_dir=request["working_dir"],
        volumes=volumes,
    )
