"""What the engine is asked to create for a ContainerSpec: the limits, mounts, GPUs and hardening
every managed container gets, in the terms of the engine's create call."""

from __future__ import annotations

from typing import Any

import docker
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from ..config import Config
from ..claims.disks import GIB
from ..claims.records import ContainerSpec
from ..claims.resources import CONTAINER_INFINIBAND_DIR, format_cpu_list
from .networks import claim_network_for

_MIB = 1024 * 1024
# Capabilities of Docker's default set that a job never needs: NET_RAW (raw sockets: ARP and
# DNS spoofing of neighbours on the bridge), MKNOD (device nodes), AUDIT_WRITE (the host's
# audit log), SETFCAP and SETPCAP (granting file or process capabilities), SYS_CHROOT.
DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP", "SETPCAP", "SYS_CHROOT")


def cpu_weight(cpus: float) -> int:
    """The claim's CPU weight under contention, in proportion to its limit: a thousand per CPU (the
    kernel's floor is 2). Not the engine's 1024 per CPU, which is also its "never set" default: an
    audit (docker-bench-security 5.12, CIS Docker) could not tell a claim's priority from none."""
    return max(2, round(cpus * 1000))


def create_arguments(api: docker.APIClient, spec: ContainerSpec, config: Config) -> dict[str, Any]:
    """The keyword arguments of `api.create_container` for the spec; its labels record the claim, GPUs and ports."""
    return {
        "image": spec.image,
        "command": list(spec.command) or None,
        "environment": spec.environment(),
        "working_dir": spec.working_dir or None,
        "labels": spec.labels(),
        "name": spec.name,
        "ports": [(m.container_port, m.protocol) for m in spec.port_mappings],
        "host_config": _host_config(api, spec, config),
        "detach": True,
    }


def _host_config(api: docker.APIClient, spec: ContainerSpec, config: Config) -> dict[str, Any]:
    bindings: dict[str, list[int]] = {}
    for mapping in spec.port_mappings:
        bindings.setdefault(mapping.container_key, []).append(mapping.host_port)
    ib_devices = [f"{host}:{CONTAINER_INFINIBAND_DIR}/{host.rsplit('/', 1)[-1]}:rwm" for host in spec.infiniband_devices]
    memory_bytes = spec.memory_mb * _MIB if spec.memory_mb else None
    return api.create_host_config(
        # Mounts, not Binds: the engine never creates a missing source as root.
        mounts=[
            Mount(volume.target, source, type="bind", read_only=volume.read_only)
            for volume, source in zip(spec.volumes, spec.mount_sources, strict=True)
        ] + [Mount(mount.path, source, type="bind", read_only=mount.read_only) for mount, source in zip(spec.mounts, spec.claim_mount_sources, strict=True)],
        port_bindings=bindings,
        # The agent's claims network (isolated); with isolation off, the engine's default bridge.
        network_mode=claim_network_for(config).name if config.network_isolation else None,
        device_requests=[DeviceRequest(driver="nvidia", device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])] if spec.gpu_uuids else None,
        privileged=False,
        cap_drop=list(DROPPED_CAPABILITIES),
        security_opt=["no-new-privileges"],
        pids_limit=config.pids_limit,
        log_config=LogConfig(type="json-file", config={"max-size": config.log_max_size, "max-file": str(config.log_max_files)}),
        restart_policy={"Name": spec.restart_policy} if spec.restart_policy != "no" else None,
        nano_cpus=round(spec.cpus * 1e9) if spec.cpus else None,
        cpu_shares=cpu_weight(spec.cpus) if spec.cpus else None,
        # Swap equal to the limit: no swap, so going over the limit is an OOM kill, not a crawl.
        mem_limit=memory_bytes,
        memswap_limit=memory_bytes,
        ipc_mode="private",
        shm_size=spec.shm_size_mb * _MIB if spec.shm_size_mb else None,
        cpuset_cpus=format_cpu_list(spec.cpuset) or None,
        cpuset_mems=format_cpu_list(spec.memory_nodes) or None,
        # RDMA pins memory: NCCL over InfiniBand needs the devices, IPC_LOCK and no memlock limit.
        devices=ib_devices or None,
        cap_add=["IPC_LOCK"] if ib_devices else None,
        ulimits=[Ulimit(name="memlock", soft=spec.memlock_bytes, hard=spec.memlock_bytes)] if ib_devices else None,
        # The container disk, enforced by the storage driver where it can (disks/quota.py): a write past it is ENOSPC or EDQUOT.
        storage_opt={"size": str(int(spec.disk_gb * GIB))} if spec.disk_quota == "engine" and spec.disk_gb else None,
    )
