"""The node's GPU inventory: what each GPU is and how it is doing, read through NVML.

This is the only module that imports pynvml (nvidia-ml-py). Each gunicorn worker builds its
own inventory after the fork, because an NVML session must not cross a fork. Facts that never
change while the driver is loaded (handle, name, UUID, total memory, PCI address, NUMA node,
compute capability, topology, driver versions) are read once per inventory; changing fields
are read on every snapshot, memory-health counters when asked. Every optional read goes through
one guarded helper, as gpustat does: a field NVML cannot read is None, and a GPU that fails
(lost, or without a readable UUID) is still listed, marked unhealthy so it is never allocated.
Every call is registered with the NVML watchdog while it runs, so a hung driver shows.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import GPU_BACKENDS
from .watchdog import NvmlWatchdog

log = logging.getLogger("utopia_agent.gpus")

NVML_FALLBACK_NOTE = "nvml-fallback"

# NVML topology levels run from 0 (same board) to 50 (across CPU sockets); a pair we cannot
# measure counts as far apart as NVML knows, so selection never prefers it by accident.
DISTANCE_SAME_GPU = 0
DISTANCE_UNKNOWN = 50

# nvidia-smi's names for the levels of NVML's topology, as `nvidia-smi topo -m` prints them.
TOPOLOGY_NAMES = {0: "BOARD", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}

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


@dataclass(frozen=True)
class GpuFacts:
    """What a GPU is, read once: for /api/v1/gpus and /api/v1/node; None where NVML cannot say."""

    index: int
    uuid: str | None
    name: str | None
    pci_bus_id: str | None
    numa_node: int | None
    compute_capability: str | None


@dataclass(frozen=True)
class DriverFacts:
    """The driver's versions, read once; None where NVML cannot say (or without NVML)."""

    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_version: str | None = None


@dataclass(frozen=True)
class GpuCounters:
    """A GPU's memory-health counters (None: this GPU cannot report it): what dcgm-exporter
    exports as DCGM_FI_DEV_ECC_DBE_VOL_TOTAL, _RETIRED_PENDING and the remapped-row series."""

    ecc_dbe_volatile: int | None = None
    retired_pages_pending: int | None = None
    rows_correctable: int | None = None
    rows_uncorrectable: int | None = None
    row_remap_pending: int | None = None
    row_remap_failure: int | None = None


@dataclass(frozen=True)
class GpuEvent:
    """One driver event: `kind` is "xid" (with the Xid as `code`) or "double_bit_ecc"."""

    uuid: str | None
    kind: str
    code: int


class GpuEvents:
    """A stream of driver events for this process; `wait` answers None when none came in time."""

    watched = 0  # GPUs whose events come here

    def wait(self) -> GpuEvent | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the event set; safe to call twice."""


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

    def facts(self) -> list[GpuFacts]:
        """What each GPU is, in index order."""
        return []

    def driver(self) -> DriverFacts:
        return DriverFacts()

    def topology(self) -> list[list[str | None]]:
        """How every pair of GPUs is connected, as `nvidia-smi topo -m` names it ("X" on the
        diagonal, "NV<links>" for NVLink, else the PCIe level); None where NVML cannot say."""
        count = len(self.facts())
        return [["X" if a == b else None for b in range(count)] for a in range(count)]

    def counters(self) -> dict[int, GpuCounters]:
        """Memory-health counters by GPU index, freshly read."""
        return {}

    def open_events(self) -> GpuEvents | None:
        """Driver events (Xids, double-bit ECC errors) for this process; None without NVML."""
        return None

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

    def facts(self) -> list[GpuFacts]:
        return [GpuFacts(gpu.index, gpu.uuid, gpu.name, None, None, None) for gpu in self._gpus]


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
    pci_bus_id: str | None = None
    numa_node: int | None = None
    compute_capability: str | None = None


class _FieldReader:
    """The one guarded path for optional NVML reads of one GPU.

    An NVMLError for a field makes that field None and leaves its code in `error`. A GPU
    that failed (lost, or without a handle) is remembered and later reads of it are skipped:
    each would only fail again, and a lost GPU can make the driver slow to answer.
    """

    def __init__(self, pynvml: Any, watchdog: NvmlWatchdog, failed: bool = False) -> None:
        self._nvml = pynvml
        self._watchdog = watchdog
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
            with self._watchdog.watch(call.__name__):
                return call(*args)
        except self._field_errors as exc:
            self.error = getattr(exc, "value", self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            self.failed = self.error == self._nvml.NVML_ERROR_GPU_IS_LOST
            return None


class NvmlGpuInventory(GpuInventory):
    """GPUs read through NVML; snapshots may come from several threads at once."""

    backend = "nvml"

    def __init__(self, watchdog: NvmlWatchdog | None = None) -> None:
        import pynvml

        self._nvml = pynvml
        self._watchdog = watchdog or NvmlWatchdog()
        self._lock = threading.Lock()
        self._memory_v2 = True
        with self._watchdog.watch("nvmlInit"):
            pynvml.nvmlInit()
        self._open = True
        try:
            with self._watchdog.watch("nvmlDeviceGetCount"):
                count = pynvml.nvmlDeviceGetCount()
            self._gpus = [self._read_static(i) for i in range(count)]
            self._distances = self._read_topology()
            self._nvlinks = self._read_nvlinks()
            self._driver = self._read_driver()
        except BaseException:
            self.close()
            raise

    def _reader(self, failed: bool = False) -> _FieldReader:
        return _FieldReader(self._nvml, self._watchdog, failed)

    def _read_static(self, index: int) -> _StaticFacts:
        nvml = self._nvml
        reader = self._reader()
        handle = reader.read(nvml.nvmlDeviceGetHandleByIndex, index)
        reader.failed = reader.failed or handle is None
        uuid = reader.read(nvml.nvmlDeviceGetUUID, handle)
        name = reader.read(nvml.nvmlDeviceGetName, handle)
        memory = reader.read(nvml.nvmlDeviceGetMemoryInfo, handle)
        failed = reader.failed
        cpus = reader.read(nvml.nvmlDeviceGetCpuAffinity, handle, _AFFINITY_WORDS)
        nodes = reader.read(nvml.nvmlDeviceGetMemoryAffinity, handle, _AFFINITY_WORDS, _NVML_AFFINITY_SCOPE_NODE)
        pci = reader.read(nvml.nvmlDeviceGetPciInfo, handle)
        numa = reader.read(nvml.nvmlDeviceGetNumaNodeId, handle)
        capability = reader.read(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        return _StaticFacts(
            index=index,
            handle=handle,
            uuid=uuid,
            name=name,
            memory_total_mb=_mib(memory, "total"),
            failed=failed,
            locality=Locality(_mask_bits(cpus), _mask_bits(nodes)),
            pci_bus_id=_text(pci.busId) if pci is not None else None,
            numa_node=int(numa) if numa is not None and numa >= 0 else None,
            compute_capability=f"{capability[0]}.{capability[1]}" if capability is not None else None,
        )

    def _read_topology(self) -> dict[tuple[int, int], int]:
        """The common-ancestor level of every pair of readable GPUs; missing pairs are unknown."""
        readable = [gpu for gpu in self._gpus if not gpu.failed]
        distances = {}
        for i, a in enumerate(readable):
            for b in readable[i + 1 :]:
                level = self._reader().read(self._nvml.nvmlDeviceGetTopologyCommonAncestor, a.handle, b.handle)
                if level is not None:
                    distances[(a.index, b.index)] = int(level)
        return distances

    def _read_nvlinks(self) -> dict[tuple[int, int], int]:
        """Active NVLinks from each readable GPU to each other GPU, found by the far end's PCI address."""
        nvml = self._nvml
        by_bus_id = {gpu.pci_bus_id: gpu.index for gpu in self._gpus if gpu.pci_bus_id}
        links: dict[tuple[int, int], int] = {}
        for gpu in (g for g in self._gpus if not g.failed):
            reader = self._reader()
            for link in range(nvml.NVML_NVLINK_MAX_LINKS):
                active = reader.read(nvml.nvmlDeviceGetNvLinkState, gpu.handle, link)
                if reader.error is not None:  # no NVLink here, or no more links on this GPU
                    break
                remote = reader.read(nvml.nvmlDeviceGetNvLinkRemotePciInfo, gpu.handle, link) if active else None
                peer = by_bus_id.get(_text(remote.busId)) if remote is not None else None
                if peer is not None and peer != gpu.index:
                    links[(gpu.index, peer)] = links.get((gpu.index, peer), 0) + 1
        return links

    def _read_driver(self) -> DriverFacts:
        nvml = self._nvml
        reader = self._reader()
        cuda = reader.read(nvml.nvmlSystemGetCudaDriverVersion)
        return DriverFacts(
            driver_version=_text(reader.read(nvml.nvmlSystemGetDriverVersion)),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            nvml_version=_text(reader.read(nvml.nvmlSystemGetNVMLVersion)),
        )

    def facts(self) -> list[GpuFacts]:
        return [
            GpuFacts(gpu.index, gpu.uuid, gpu.name, gpu.pci_bus_id, gpu.numa_node, gpu.compute_capability)
            for gpu in self._gpus
        ]

    def driver(self) -> DriverFacts:
        return self._driver

    def topology(self) -> list[list[str | None]]:
        indices = [gpu.index for gpu in self._gpus]
        return [[self._connection(a, b) for b in indices] for a in indices]

    def _connection(self, a: int, b: int) -> str | None:
        if a == b:
            return "X"
        if self._nvlinks.get((a, b)):
            return f"NV{self._nvlinks[(a, b)]}"
        level = self._distances.get((min(a, b), max(a, b)))
        return TOPOLOGY_NAMES.get(level) if level is not None else None

    def counters(self) -> dict[int, GpuCounters]:
        with self._lock:
            if not self._open:
                return {}
            return {gpu.index: self._read_counters(gpu) for gpu in self._gpus if not gpu.failed}

    def _read_counters(self, gpu: _StaticFacts) -> GpuCounters:
        nvml = self._nvml
        reader = self._reader()
        dbe = reader.read(nvml.nvmlDeviceGetTotalEccErrors, gpu.handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        pending = reader.read(nvml.nvmlDeviceGetRetiredPagesPendingStatus, gpu.handle)
        rows = reader.read(nvml.nvmlDeviceGetRemappedRows, gpu.handle) or (None,) * 4
        return GpuCounters(
            ecc_dbe_volatile=dbe,
            retired_pages_pending=pending,
            rows_correctable=rows[0],
            rows_uncorrectable=rows[1],
            row_remap_pending=rows[2],
            row_remap_failure=rows[3],
        )

    def open_events(self) -> GpuEvents | None:
        with self._lock:
            if not self._open:
                return None
        return _NvmlEvents(self._nvml, self._watchdog, [gpu for gpu in self._gpus if not gpu.failed])

    def snapshot(self) -> list[GpuStatus]:
        with self._lock:
            if not self._open:
                return []
            return [self._read_status(gpu) for gpu in self._gpus]

    def _read_status(self, gpu: _StaticFacts) -> GpuStatus:
        nvml = self._nvml
        reader = self._reader(failed=gpu.failed)
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
                with self._watchdog.watch("nvmlShutdown"):
                    self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)


class _NvmlEvents(GpuEvents):
    """An NVML event set registered for Xids and double-bit ECC errors on every readable GPU.

    The driver gives each event set every event that comes after it was made, so every process
    that watches sees every event: the agent keeps one watcher per node (gpu_health)."""

    WAIT_MS = 1000

    def __init__(self, nvml: Any, watchdog: NvmlWatchdog, gpus: list[_StaticFacts]):
        self._nvml = nvml
        self._watchdog = watchdog
        wanted = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypeDoubleBitEccError
        with watchdog.watch("nvmlEventSetCreate"):
            self._set = nvml.nvmlEventSetCreate()
        self._uuids: dict[int | None, str | None] = {}
        for gpu in gpus:
            reader = _FieldReader(nvml, watchdog)
            supported = reader.read(nvml.nvmlDeviceGetSupportedEventTypes, gpu.handle)
            if supported is None or not supported & wanted:
                log.info("NVML reports no Xid or ECC events for gpu=%s; its counters are still read", gpu.index)
                continue
            reader.read(nvml.nvmlDeviceRegisterEvents, gpu.handle, supported & wanted, self._set)
            if reader.error is None:
                self._uuids[_address(gpu.handle)] = gpu.uuid
        self.watched = len(self._uuids)

    def wait(self) -> GpuEvent | None:
        nvml = self._nvml
        try:
            with self._watchdog.watch("nvmlEventSetWait_v2", allowance=self.WAIT_MS / 1000):
                data = nvml.nvmlEventSetWait_v2(self._set, self.WAIT_MS)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_TIMEOUT:
                return None
            raise
        uuid = self._uuids.get(_address(data.device))
        if data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return GpuEvent(uuid, "xid", int(data.eventData))
        return GpuEvent(uuid, "double_bit_ecc", int(data.eventData))

    def close(self) -> None:
        if self._set is None:
            return
        event_set, self._set = self._set, None
        try:
            with self._watchdog.watch("nvmlEventSetFree"):
                self._nvml.nvmlEventSetFree(event_set)
        except self._nvml.NVMLError as exc:
            log.debug("nvmlEventSetFree failed: %s", exc)


def _address(handle: Any) -> int | None:
    """A device handle's address: how an event's device is matched to a GPU."""
    return ctypes.cast(handle, ctypes.c_void_p).value if handle is not None else None


def _text(value: Any) -> str | None:
    """NVML strings come back as bytes from some calls and str from others."""
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _open_nvml(watchdog: NvmlWatchdog | None) -> NvmlGpuInventory:
    """An NVML inventory, or GpuBackendError saying why NVML cannot serve this node."""
    try:
        import pynvml
    except ImportError as exc:
        raise GpuBackendError(f"nvidia-ml-py is not installed ({exc})") from exc
    try:
        return NvmlGpuInventory(watchdog)
    except pynvml.NVMLError as exc:
        raise GpuBackendError(f"NVML did not load: {exc}") from exc


def make_inventory(
    backend: str, fake_gpu_count: int = 0, watchdog: NvmlWatchdog | None = None, first_to_log: Callable[[str], bool] = lambda note: True
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
        return _open_nvml(watchdog)
    if backend == "auto":
        try:
            return _open_nvml(watchdog)
        except GpuBackendError as exc:
            if first_to_log(NVML_FALLBACK_NOTE):
                log.warning("GPU backend auto: %s; serving no GPUs", exc)
            return GpuInventory()
    raise ValueError(f"unknown GPU backend {backend!r}; expected one of {', '.join(GPU_BACKENDS)}")
