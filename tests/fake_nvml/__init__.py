"""A stand-in NVML driver library for tests: build it, describe GPUs, and run code against it.

`fake_nvml.c` compiles into `libnvidia-ml.so.1`; a process whose LD_LIBRARY_PATH starts with
that directory runs the real nvidia-ml-py against the GPUs described in the file named by
FAKE_NVML_CONFIG. glibc reads LD_LIBRARY_PATH only when a process starts, so the code under
test must run in a child process (a `python -c` probe, or the agent under gunicorn) started
with `fake_nvml_env(...)`. While it runs, a test may rewrite the scenario, append driver
events (`inject_event`) and make every NVML call block (`hung_nvml`).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Iterator

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"

# NVML return codes a scenario may ask the stand-in to answer.
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25

# NVML event types (nvmlEventType*) a test may inject.
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID = 0x8


@dataclass(frozen=True)
class FakeGpu:
    """One scripted GPU; None in a field makes NVML answer "Not Supported" for it."""

    name: str | None
    uuid: str | None
    memory_total_mib: int | None = 81559
    memory_used_mib: int | None = 0
    memory_reserved_mib: int | None = 0
    temperature_c: int | None = 30
    utilization_percent: int | None = 0
    compute_processes: int | None = 0
    lost: bool = False
    pci_bus_id: str = ""
    switch: int = 0
    numa: int = 0
    ecc_dbe: int | None = 0
    retired_pending: int | None = 0
    rows_correctable: int | None = 0
    rows_uncorrectable: int | None = 0
    remap_pending: int = 0
    remap_failure: int = 0
    # The NVML index at the far end of each NVLink; empty: no NVLink.
    nvlink_peers: tuple[int, ...] = ()

    def config_line(self) -> str:
        fields = [
            self.name,
            self.uuid,
            self.memory_total_mib,
            self.memory_used_mib,
            self.memory_reserved_mib,
            self.temperature_c,
            self.utilization_percent,
            self.compute_processes,
            int(self.lost),
            self.pci_bus_id,
            self.switch,
            self.numa,
            self.ecc_dbe,
            self.retired_pending,
            self.rows_correctable,
            self.rows_uncorrectable,
            self.remap_pending,
            self.remap_failure,
            " ".join(str(peer) for peer in self.nvlink_peers),
        ]
        text = ["NA" if value is None else str(value) for value in fields]
        if any("|" in value or "\n" in value for value in text):
            raise ValueError(f"fake GPU fields may not contain '|' or newlines: {text}")
        return "|".join(text)


def fake_gpu(index: int, **changes) -> FakeGpu:
    """An H100 at NVML index `index`: two GPUs per PCIe switch, four per CPU socket."""
    gpu = FakeGpu(
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-00000000-0000-0000-0000-{index:012d}",
        temperature_c=30 + index,
        pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        switch=index // 2,
        numa=index // 4,
    )
    return replace(gpu, **changes)


def fake_gpus(count: int = 8) -> list[FakeGpu]:
    """`count` healthy H100s."""
    return [fake_gpu(i) for i in range(count)]


# What the agent's integration tests run against: GPU 3 cannot report its temperature, and
# GPU 6 has fallen off the bus (listed, never allocated).
DEFAULT_TEST_GPUS: list[FakeGpu] = [
    fake_gpu(i, temperature_c=None) if i == 3 else fake_gpu(i, lost=True) if i == 6 else fake_gpu(i)
    for i in range(8)
]


def write_fake_nvml_config(
    path: str | os.PathLike,
    gpus: list[FakeGpu],
    *,
    driver_version: str = "550.54.15",
    init_error: int = 0,
    memory_v2_error: int = 0,
    numa_cpus: str | None = None,
) -> Path:
    """Write a scenario for the stand-in; it replaces the file atomically, so a running
    process sees either the old or the new scenario and re-reads it on its next NVML call.

    `numa_cpus` lists the CPUs of each numa node ("0-31;32-63", the stand-in's default; "NA"
    for no affinity answers): each GPU's CPU affinity is the list of its `numa` node."""
    path = Path(path)
    lines = [
        f"driver_version={driver_version}",
        f"init_error={init_error}",
        f"memory_v2_error={memory_v2_error}",
        *([f"numa_cpus={numa_cpus}"] if numa_cpus is not None else []),
        *(gpu.config_line() for gpu in gpus),
    ]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def inject_event(config_path: str | os.PathLike, uuid: str, event_type: int, data: int = 0) -> None:
    """Raise a driver event on the GPU `uuid` (EVENT_XID with the Xid as data, or
    EVENT_DOUBLE_BIT_ECC): every event set made before it receives it once."""
    line = f"{uuid}|{event_type}|{data}\n".encode()
    fd = os.open(f"{config_path}.events", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@contextmanager
def hung_nvml(config_path: str | os.PathLike) -> Iterator[None]:
    """Every NVML call of the processes on this scenario blocks until the block ends."""
    switch = Path(f"{config_path}.hang")
    switch.touch()
    try:
        yield
    finally:
        switch.unlink(missing_ok=True)


def build_fake_nvml(dest_dir: str | os.PathLike) -> Path:
    """Compile the stand-in into `dest_dir/libnvidia-ml.so.1` (unless it is newer than the
    source) and return `dest_dir`, the directory to put first on LD_LIBRARY_PATH."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    library = dest / LIBRARY_NAME
    if library.exists() and library.stat().st_mtime >= SOURCE.stat().st_mtime:
        return dest
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".libnvidia-ml.", suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fake_nvml_env(
    library_dir: str | os.PathLike | None,
    config_path: str | os.PathLike | None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """A child-process environment that loads the stand-in (put first on LD_LIBRARY_PATH)
    and reads the given scenario; None for either leaves that variable out."""
    env = dict(os.environ if base is None else base)
    env.pop("FAKE_NVML_CONFIG", None)
    if library_dir is not None:
        inherited = env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(library_dir), inherited]))
    if config_path is not None:
        env["FAKE_NVML_CONFIG"] = str(config_path)
    return env
