"""The node's GPU inventory: what each GPU is and how it is doing, read through NVML.

This is the only module that imports pynvml (nvidia-ml-py). Each gunicorn worker builds its
own inventory after the fork, because an NVML session must not cross a fork. Facts that never
change while the driver is loaded (handle, name, UUID, total memory, topology) are read once
per inventory; changing fields are read on every snapshot. Every optional read goes through
one guarded helper, as gpustat does: a field NVML cannot read is None, and a GPU that fails
(lost, or without a readable UUID) is still listed, marked unhealthy so it is never allocated.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nvml", "fake", "none")
NVML_FALLBACK_NOTE = "nvml-fallback"

# NVML topology levels run from 0 (same board) to 50 (across CPU sockets); a pair we cannot
# measure counts as far apart as NVML knows, so selection never prefers it by accident.
DISTANCE_SAME_GPU = 0
DISTANCE_UNKNOWN = 50

_MIB = 1024 * 1024

# Errors of the v2 memory query that mean this driver lacks it (not that the GPU failed).
_NO_MEMORY_V2 = (13, 25)  # NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH

# Affinity masks are read as this many 64-bit words: room for 1024 CPUs and 1024 memory nodes.
_AFFINITY_WORDS = 16
_NVML_AFFINITY_SCOPE_NODE = 0


def _mask_bits(words: Any) -> frozenset[int] | None:
    """The set bits of an NVML affinity mask (64-bit words, lowest first), or None when the read failed."""
    if words is None:
        return None
    return frozenset(w * 64 + b for w, word in enumerate(words) for b in range(64) if word >> b & 1)


def _mib(memory: Any, field: str = "used") -> int | None:
    """A field of an NVML memory struct in MiB, or None when the read failed."""
    return getattr(memory, field) // _MIB if memory is not None else None


@dataclass(frozen=True)
class GpuStatus:
    """One GPU at one moment; None marks a field NVML could not read on this GPU."""

    index: int
    uuid: str | None
    name: str | None
    memory_total_mb: int | None
    memory_used_mb: int | None
    temperature_c: int | None
    usage_percent: float | None
    compute_processes: bool
    healthy: bool


@dataclass(frozen=True)
class Locality:
    """The CPUs and memory nodes close to some GPUs, as NVML reports them; None where it cannot say."""

    cpus: frozenset[int] | None = None
    memory_nodes: frozenset[int] | None = None


class GpuBackendError(Exception):
    """The requested GPU backend cannot serve this node; the message says why."""


class GpuInventory:
    """The GPUs of this node, as the allocator and the metrics endpoints see them."""

    backend = "none"

    def snapshot(self) -> list[GpuStatus]:
        """Every GPU in index order, with freshly read changing fields."""
        return []

    def distance(self, a: int, b: int) -> int:
        """How far apart two GPUs sit (an NVML topology level): lower is closer."""
        return DISTANCE_SAME_GPU if a == b else DISTANCE_UNKNOWN

    def locality(self, indices) -> Locality:
        """The CPUs and memory nodes local to the GPUs `indices` (the union over them)."""
        return Locality()

    def close(self) -> None:
        """Release what the inventory holds; safe to call twice."""


class FakeGpuInventory(GpuInventory):
    """Made-up healthy GPUs with stable UUIDs, for running an orchestrator against a laptop."""

    backend = "fake"

    def __init__(self, count: int) -> None:
        self._gpus = [
            GpuStatus(
                index=i,
                uuid=f"GPU-fake-0000-0000-0000-{i:012d}",
                name="Fake GPU",
                memory_total_mb=81920,
                memory_used_mb=0,
                temperature_c=30,
                usage_percent=0.0,
                compute_processes=False,
                healthy=True,
            )
            for i in range(max(0, count))
        ]

    def snapshot(self) -> list[GpuStatus]:
        return list(self._gpus)


@dataclass
class _StaticFacts:
    """What NVML says about a GPU once per inventory; None where it could not say."""

    index: int
    handle: Any
    uuid: str | None
    name: str | None
    memory_total_mb: int | None
    failed: bool
    locality: Locality = Locality()


class _FieldReader:
    """The one guarded path for optional NVML reads of one GPU.

    An NVMLError for a field makes that field None and leaves its code in `error`. A GPU
    that failed (lost, or without a handle) is remembered and later reads of it are skipped:
    each would only fail again, and a lost GPU can make the driver slow to answer.
    """

    def __init__(self, pynvml: Any, failed: bool = False) -> None:
        self._nvml = pynvml
        # Newer bindings raise NVMLLibraryMismatchError (not an NVMLError) for a function the
        # driver lacks behind an unversioned name; older ones raise NVMLError_FunctionNotFound.
        mismatch = getattr(pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError)
        self._field_errors = (pynvml.NVMLError, mismatch)
        self.failed = failed
        self.error: int | None = None

    def read(self, call: Callable[..., Any], *args: Any) -> Any:
        if self.failed:
            self.error = self._nvml.NVML_ERROR_GPU_IS_LOST
            return None
        self.error = None
        try:
            return call(*args)
        except self._field_errors as exc:
            self.error = getattr(exc, "value", self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            self.failed = self.error == self._nvml.NVML_ERROR_GPU_IS_LOST
            return None


class NvmlGpuInventory(GpuInventory):
    """GPUs read through NVML; snapshots may come from several threads at once."""

    backend = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        self._lock = threading.Lock()
        self._memory_v2 = True
        pynvml.nvmlInit()
        self._open = True
        try:
            count = pynvml.nvmlDeviceGetCount()
            self._gpus = [self._read_static(i) for i in range(count)]
            self._distances = self._read_topology()
        except BaseException:
            self.close()
            raise

    def _read_static(self, index: int) -> _StaticFacts:
        reader = _FieldReader(self._nvml)
        handle = reader.read(self._nvml.nvmlDeviceGetHandleByIndex, index)
        reader.failed = reader.failed or handle is None
        uuid = reader.read(self._nvml.nvmlDeviceGetUUID, handle)
        name = reader.read(self._nvml.nvmlDeviceGetName, handle)
        memory = reader.read(self._nvml.nvmlDeviceGetMemoryInfo, handle)
        cpus = reader.read(self._nvml.nvmlDeviceGetCpuAffinity, handle, _AFFINITY_WORDS)
        nodes = reader.read(self._nvml.nvmlDeviceGetMemoryAffinity, handle, _AFFINITY_WORDS, _NVML_AFFINITY_SCOPE_NODE)
        return _StaticFacts(
            index=index,
            handle=handle,
            uuid=uuid,
            name=name,
            memory_total_mb=_mib(memory, "total"),
            failed=reader.failed,
            locality=Locality(_mask_bits(cpus), _mask_bits(nodes)),
        )

    def _read_topology(self) -> dict[tuple[int, int], int]:
        """The common-ancestor level of every pair of readable GPUs; missing pairs are unknown."""
        readable = [gpu for gpu in self._gpus if not gpu.failed]
        distances = {}
        for i, a in enumerate(readable):
            for b in readable[i + 1 :]:
                level = _FieldReader(self._nvml).read(
                    self._nvml.nvmlDeviceGetTopologyCommonAncestor, a.handle, b.handle
                )
                if level is not None:
                    distances[(a.index, b.index)] = int(level)
        return distances

    def snapshot(self) -> list[GpuStatus]:
        with self._lock:
            if not self._open:
                return []
            return [self._read_status(gpu) for gpu in self._gpus]

    def _read_status(self, gpu: _StaticFacts) -> GpuStatus:
        nvml = self._nvml
        reader = _FieldReader(nvml, failed=gpu.failed)
        memory_used = self._read_memory_used(reader, gpu.handle)
        temperature = reader.read(nvml.nvmlDeviceGetTemperature, gpu.handle, nvml.NVML_TEMPERATURE_GPU)
        utilisation = reader.read(nvml.nvmlDeviceGetUtilizationRates, gpu.handle)
        processes = reader.read(nvml.nvmlDeviceGetComputeRunningProcesses, gpu.handle)
        return GpuStatus(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            memory_total_mb=gpu.memory_total_mb,
            memory_used_mb=memory_used,
            temperature_c=int(temperature) if temperature is not None else None,
            usage_percent=float(utilisation.gpu) if utilisation is not None else None,
            compute_processes=bool(processes),
            healthy=gpu.uuid is not None and not reader.failed,
        )

    def _read_memory_used(self, reader: _FieldReader, handle: Any) -> int | None:
        """Used memory in MiB, from the v2 query where the driver has it: v1 counts the
        driver's reserved memory as used, so an idle GPU would look partly busy."""
        nvml = self._nvml
        if self._memory_v2:
            memory = reader.read(nvml.nvmlDeviceGetMemoryInfo, handle, nvml.nvmlMemory_v2)
            if reader.error not in _NO_MEMORY_V2:
                return _mib(memory)
            self._memory_v2 = False
            log.info("NVML has no v2 memory query; used memory includes reserved memory")
        return _mib(reader.read(nvml.nvmlDeviceGetMemoryInfo, handle))

    def distance(self, a: int, b: int) -> int:
        if a == b:
            return DISTANCE_SAME_GPU
        return self._distances.get((min(a, b), max(a, b)), DISTANCE_UNKNOWN)

    def locality(self, indices) -> Locality:
        """Read once per inventory (affinity is fixed by the board); None when any GPU's is unknown."""
        facts = [self._gpus[i].locality for i in indices if 0 <= i < len(self._gpus)]
        if not facts:
            return Locality()

        def union(parts):
            return None if any(p is None for p in parts) else frozenset().union(*parts)

        return Locality(union([f.cpus for f in facts]), union([f.memory_nodes for f in facts]))

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)


def _open_nvml() -> NvmlGpuInventory:
    """An NVML inventory, or GpuBackendError saying why NVML cannot serve this node."""
    try:
        import pynvml
    except ImportError as exc:
        raise GpuBackendError(f"nvidia-ml-py is not installed ({exc})") from exc
    try:
        return NvmlGpuInventory()
    except pynvml.NVMLError as exc:
        raise GpuBackendError(f"NVML did not load: {exc}") from exc


def make_inventory(
    backend: str, fake_gpu_count: int = 0, first_to_log: Callable[[str], bool] = lambda note: True
) -> GpuInventory:
    """The inventory for UTOPIA_AGENT_GPU_BACKEND: auto, nvml, fake or none.

    `first_to_log(note)` says whether this process is the first of its agent to log a note,
    so `auto` without NVML is said once per agent, not once per worker.
    """
    if backend == "none":
        return GpuInventory()
    if backend == "fake":
        return FakeGpuInventory(fake_gpu_count)
    if backend == "nvml":
        return _open_nvml()
    if backend == "auto":
        try:
            return _open_nvml()
        except GpuBackendError as exc:
            if first_to_log(NVML_FALLBACK_NOTE):
                log.warning("GPU backend auto: %s; serving no GPUs", exc)
            return GpuInventory()
    raise ValueError(f"unknown GPU backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def gpu_keys(held) -> tuple[str, ...]:
    """How the GPUs a container holds (Holdings or ManagedContainer) are told apart: by UUID,
    which survives NVML renumbering after a reboot; by '#<index>' only for labels without UUIDs."""
    if held.gpu_uuids and len(held.gpu_uuids) == len(held.gpu_ids):
        return tuple(held.gpu_uuids)
    return tuple(f"#{index}" for index in held.gpu_ids)


def gpu_key_held(gpu, keys: set[str] | dict) -> bool:
    """Whether a GPU of the inventory is among the held `keys` (see gpu_keys)."""
    return gpu.uuid in keys or f"#{gpu.index}" in keys
